"""GPU validation: one command checks on a Hopper GPU what the CPU tests cannot.

    bash benchmarks/gpu_suite.sh fetch          # here (PyPI): the pinned wheels into .whl/
    bash benchmarks/gpu_suite.sh run OUT        # on the GPU machine: install .whl/, run the suite
    python benchmarks/gpu_suite.py OUT [--dry-run] [--only SECTION ...] [--budget 480]

The GPU machine has torch with CUDA, triton and pybind11 but none of our other dependencies and
no network: `gpu_suite.sh run` installs the wheels listed in benchmarks/gpu_wheels.txt from the
folder .whl/ that travels with the tree. The sections run one after another, each a subprocess
with its own time limit, so a hang or a crash is recorded and the others still run; the whole
suite is planned to finish within `--budget` seconds (default 8 minutes):

  build         the extension for sm_90 (PHASED_DMD_CUDA=ON: fails without nvcc)
  kernel_tests  the CUDA test cases: kernel parity with the reference, every dtype, odd sizes,
                t close to s (tests/test_kernels.py, tests/test_losses.py)
  kernels       benchmarks/bench_kernels.py on CUDA, 16M-256M elements, fp32 and bf16: fused vs
                eager vs torch.compile and the fraction of the GPU's HBM peak
  block         one Wan2.1-14B block (hidden 5120, 40 heads, FFN 13824) at 32,760 tokens,
                benchmarks/bench_model.py: bf16 and FP8 (torch), recompute off and on
  model         the Wan2.1-1.3B model at 480p x 81 frames (21 x 60 x 104 latent), same variants
  distill       Phased DMD on the 1.3B architecture (random weights, that latent, LoRA
                generator, bf16, recompute) under torchrun with NCCL on the one GPU: seconds per
                iteration and peak memory, next to preflight's estimate where it exists
  sequence      two GPUs (skipped on one: NCCL runs one rank per GPU): the 1.3B model at that
                latent, forward + backward under tensor parallelism 2 with and without sequence
                parallelism and context parallelism 2, against one process (each GPU running the
                whole model), with recompute: step time and activations saved per GPU,
                benchmarks/bench_sequence.py; its 90 s come on top of the 8 minutes

OUT receives summary.json (every section: status, seconds, command, parsed results, the tail
of its log) and summary.md (the same as tables), plus one log per section. Without a GPU, or
with --dry-run, nothing runs: the plan (commands and limits) is checked and written, which is
how CI tests the suite (tests/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS_FILE = ROOT / "benchmarks" / "gpu_wheels.txt"
WORK = Path(os.environ.get("GPU_SUITE_WORK", "/tmp/phased_dmd_gpu_suite"))  # large files
HBM_PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0}  # per name fragment
LATENT_480P_81 = (16, 21, 60, 104)  # Wan VAE: 81 frames -> 21, 480 x 832 -> 60 x 104
SECTIONS = ("build", "kernel_tests", "kernels", "block", "model", "distill", "sequence")
ONE_GPU_BUDGET_S = 480


@dataclass
class Section:
    name: str
    command: list[str]
    limit_s: int
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 1  # GPUs it needs (skipped on a machine with fewer)
    status: str = "planned"  # planned | passed | failed | timed out | skipped
    seconds: float | None = None
    results: dict | list | None = None
    log_tail: str = ""


def pinned_wheels() -> list[str]:
    """`name==version` lines of gpu_wheels.txt, each checked against pyproject's pin."""
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    wheels = []
    for line in WHEELS_FILE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if not version:
            raise SystemExit(f"{WHEELS_FILE}: {line!r} is not pinned (name==version)")
        if name in pins and pins[name] != version:
            raise SystemExit(
                f"{WHEELS_FILE}: {name}=={version} but pyproject.toml pins {name}=={pins[name]}"
            )
        wheels.append(line)
    return wheels


def plan(out: Path) -> list[Section]:
    python = sys.executable
    bench_model = [python, str(ROOT / "benchmarks" / "bench_model.py")]
    model_args = ["--fp8", "off", "torch", "--recompute", "off", "on", "--dtype", "bfloat16"]
    _, frames, height, width = LATENT_480P_81
    latent = ["--latent", str(frames), str(height), str(width), "--text-len", "512"]
    return [
        Section(
            "build",
            [python, "setup.py", "build_ext", "--inplace"],
            100,
            {"PHASED_DMD_CUDA": "ON", "PHASED_DMD_CUDA_ARCHS": "90"},
        ),
        Section(
            "kernel_tests",
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-k",
                "cuda",
                "tests/test_kernels.py",
                "tests/test_losses.py",
            ],
            50,
        ),  # fmt: skip
        Section(
            "kernels",
            [
                python,
                str(ROOT / "benchmarks" / "bench_kernels.py"),
                "--device",
                "cuda",
                "--sizes",
                "16M",
                "64M",
                "256M",
                "--dtypes",
                "float32",
                "bfloat16",
                "--min-run-time",
                "0.2",
                "--rounds",
                "3",
                "--json",
                str(out / "kernels.json"),
            ],
            100,
        ),  # fmt: skip
        Section(
            "block",
            [
                *bench_model,
                "--model",
                str(WORK / "wan2.1_14b_one_block.yaml"),
                *latent,
                *model_args,
                "--steps",
                "5",
                "--warmup",
                "2",
                "--json",
                str(out / "block.json"),
            ],
            45,
        ),  # fmt: skip
        Section(
            "model",
            [
                *bench_model,
                "--model",
                str(ROOT / "configs" / "models" / "wan2.1_t2v_1.3b.yaml"),
                *latent,
                *model_args,
                "--steps",
                "3",
                "--warmup",
                "1",
                "--json",
                str(out / "model.json"),
            ],
            75,
        ),  # fmt: skip
        Section(
            "distill",
            [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=1",
                str(Path(__file__).resolve()),
                str(out),
                "--distill-worker",
            ],
            110,
        ),  # fmt: skip
        Section(
            "sequence",
            [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                str(ROOT / "benchmarks" / "bench_sequence.py"),
                "--model",
                str(ROOT / "configs" / "models" / "wan2.1_t2v_1.3b.yaml"),
                *latent,
                "--dtype",
                "bfloat16",
                "--recompute",
                "on",
                "--layouts",
                "tp2",
                "tp2-sp",
                "cp2",
                "--rounds",
                "3",
                "--steps",
                "2",
                "--json",
                str(out / "sequence.json"),
            ],
            90,
            gpus=2,
        ),  # fmt: skip
    ]


# --- what runs on the GPU machine ----------------------------------------------------------------


def one_block_arch() -> Path:
    """Wan2.1-14B's architecture with one layer, for the block benchmark."""
    import yaml

    arch = yaml.safe_load((ROOT / "configs" / "models" / "wan2.1_t2v_14b.yaml").read_text())
    path = WORK / "wan2.1_14b_one_block.yaml"
    path.write_text(yaml.safe_dump({**arch, "num_layers": 1}))
    return path


DISTILL_SETTINGS = [
    "num_steps=4", "num_phases=2", "phase_gradient=sgts", "generator_adapter=lora",
    "lora_rank=64", "lora_alpha=8", "dtype=bfloat16", "recompute=true", "batch_size=1",
    "micro_batch_size=1", "fake_updates=1", "iterations_per_phase=2", "log_every=1",
    "sample_every=1000", "checkpoint_every=1000", "guidance_scale=5.0", "shift=5.0",
]  # fmt: skip


def write_random_teacher(teacher: Path) -> None:
    """Wan2.1-1.3B with random weights, one prompt of 512 random text tokens, 480p x 81."""
    import torch

    from phased_dmd_mp.config import load_config
    from phased_dmd_mp.data.condition_writer import write_condition_set
    from phased_dmd_mp.data.teacher import TeacherSpec, write_spec
    from phased_dmd_mp.models import ExecutionConfig, WanConfig, build
    from phased_dmd_mp.models.convert import ours_to_diffusers, write_diffusers_dir

    arch = load_config(WanConfig, ROOT / "configs" / "models" / "wan2.1_t2v_1.3b.yaml")
    model = build(arch, ExecutionConfig(dtype="bfloat16")).cuda()
    state = {k: v.cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    write_diffusers_dir(teacher / "transformer", arch, ours_to_diffusers(state, arch))
    del model, state
    text = torch.randn(1, 512, arch.text_dim)
    write_condition_set(teacher / "conditions", {"text": text}, {"text": torch.zeros(512, 4096)})
    write_spec(teacher, TeacherSpec(latent_shape=LATENT_480P_81, shift=5.0, guidance_scale=5.0))


def distill_worker(out: Path) -> None:
    """Rank 0 of a torchrun world of one: a few Phased DMD iterations, timed and measured."""
    import torch

    from phased_dmd_mp.config import load_config
    from phased_dmd_mp.distill.config import DistillConfig
    from phased_dmd_mp.distill.trainer import Distiller

    teacher, run = WORK / "teacher_1.3b", WORK / "distill_run"
    if not (teacher / "teacher.yaml").is_file():
        write_random_teacher(teacher)
    overrides = [f"teacher={teacher}", *DISTILL_SETTINGS]
    config = load_config(DistillConfig, None, overrides)
    torch.cuda.reset_peak_memory_stats()
    distiller = Distiller(config, run, progress=False)
    distiller.train()
    seconds = [entry["seconds"] for entry in distiller.state.history]
    results = {
        "settings": overrides,
        "seconds_per_iteration": seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "preflight": preflight_estimate(overrides),
    }
    (out / "distill.json").write_text(json.dumps(results, indent=1) + "\n")


def preflight_estimate(overrides: list[str]) -> str | None:
    """preflight's printed estimate for the same run, if the package has preflight."""
    if not (ROOT / "phased_dmd_mp" / "preflight.py").exists():
        return None
    command = [sys.executable, "-m", "phased_dmd_mp.preflight", "--world-size", "1",
               "--gpu-memory", "141GiB"]  # fmt: skip
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return (done.stdout + done.stderr)[-3000:]


# --- running and summarising -------------------------------------------------------------------


def run_section(section: Section, out: Path) -> None:
    log = out / f"{section.name}.log"
    start = time.perf_counter()
    env = {**os.environ, **section.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log, "w") as handle:
        handle.write("$ " + shlex.join(section.command) + "\n")
        handle.flush()
        try:
            done = subprocess.run(
                section.command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                timeout=section.limit_s, check=False,
            )  # fmt: skip
            section.status = "passed" if done.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            section.status = "timed out"
    section.seconds = round(time.perf_counter() - start, 1)
    section.log_tail = log.read_text()[-2500:]
    result_file = out / f"{section.name}.json"
    if result_file.is_file():
        section.results = json.loads(result_file.read_text())


def kernel_table(results: dict, peak_gbps: float | None) -> list[str]:
    """One line per (op, dtype, size) of bench_kernels.py's rows (medians over its rounds): the
    fused op's bandwidth, as a fraction of the GPU's HBM peak and of the copy measured beside
    it, and its speed-up over eager and torch.compile. `copy` lines give the copy itself."""
    lines = ["| op | dtype | elements | GB/s | of HBM peak | of copy | vs eager | vs compile |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def median(row, key, scale=1.0, unit="x"):
        if key not in row:
            return ""
        value = scale * row[key]["median"]
        return f"{value:.0f}%" if unit == "%" else f"{value:.2f}{unit}"

    for row in results.get("rows", []):
        if row.get("clock", "wall") != "wall":  # CPU time says nothing about a GPU kernel
            continue
        gbps = row["gbps"]["median"]
        share = f"{100 * gbps / peak_gbps:.0f}%" if peak_gbps else "n/a"
        lines.append(
            f"| {row['op']} | {row['dtype']} | {row['elements'] / 2**20:g}M | {gbps:.0f} | "
            f"{share} | {median(row, 'of_copy', 100, '%')} | {median(row, 'vs_eager')} | "
            f"{median(row, 'vs_compile')} |"
        )
    return lines


def model_table(rows: list[dict]) -> list[str]:
    lines = ["| variant | step ms (median) | model TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['variant']} | refused: {row['refused']} | | | |")
            continue
        times = sorted(row["step_s"])
        mfu = "n/a" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        lines.append(
            f"| {row['variant']} | {1e3 * times[len(times) // 2]:.1f} | "
            f"{row['model_tflops']:.1f} | {mfu} | {row['peak_memory_gib']:.1f} |"
        )
    return lines


def sequence_table(rows: list[dict]) -> list[str]:
    """bench_sequence.py's rows: step time and saved activations per layout."""
    lines = ["| layout | recompute | step ms (median) | vs one process | saved GiB / GPU | "
             "vs tp2 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if row.get("clock", "wall") != "wall":
            continue
        versus = "" if row["saved_vs_tp2"] is None else f"{row['saved_vs_tp2']:.2f}"
        lines.append(
            f"| {row['layout']} | {row['recompute']} | {row['step_ms']['median']:.1f} | "
            f"{row['vs_one_process']['median']:.2f} | {row['saved_mib'] / 1024:.2f} | {versus} |"
        )
    return lines


def summary_markdown(device: str, sections: list[Section]) -> str:
    peak = next((v for k, v in HBM_PEAK_GBPS.items() if k in device), None)
    lines = [f"# GPU suite on {device}", "", "| section | status | seconds | limit (s) |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {s.name} | {s.status} | {s.seconds if s.seconds is not None else ''} | "
              f"{s.limit_s} |" for s in sections]  # fmt: skip
    planned = [s for s in sections if s.status == "planned"]
    if planned:  # a dry run: what a GPU machine would run (`gpu_suite.sh run OUT` there)
        lines += ["", "## plan (run on a GPU with `bash benchmarks/gpu_suite.sh run OUT`)", ""]
        for s in planned:
            env = " ".join(f"{k}={v}" for k, v in s.env.items())
            lines.append(f"- {s.name}: `{(env + ' ') if env else ''}{shlex.join(s.command)}`")
    for s in sections:
        if not s.results:
            continue
        lines += ["", f"## {s.name}", ""]
        if s.name == "kernels":
            lines += kernel_table(s.results, peak)
        elif s.name in ("block", "model"):
            lines += model_table(s.results)
        elif s.name == "sequence":
            lines += sequence_table(s.results)
        elif s.name == "distill":
            seconds = s.results["seconds_per_iteration"]
            lines.append(
                f"seconds per iteration {', '.join(f'{x:.1f}' for x in seconds)}; peak memory "
                f"{s.results['peak_memory_gib']:.1f} GiB (torch.cuda.max_memory_allocated)"
            )
            if s.results.get("preflight"):
                lines += ["", "preflight:", "```", s.results["preflight"].strip(), "```"]
    for s in sections:
        if s.status == "skipped" and s.log_tail:
            lines += ["", f"{s.name}: skipped, {s.log_tail}"]
        if s.status in ("failed", "timed out"):
            lines += ["", f"## {s.name}: {s.status}, log tail", "```", s.log_tail.strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for summary.json, summary.md and logs")
    parser.add_argument("--dry-run", action="store_true", help="plan only (default without GPU)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    parser.add_argument(
        "--budget",
        type=float,
        help=f"seconds for the whole suite (default {ONE_GPU_BUDGET_S}, plus the multi-GPU "
        "sections' limits where the machine runs them)",
    )
    parser.add_argument("--distill-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.distill_worker:
        distill_worker(args.out)
        return 0

    import torch

    wheels = pinned_wheels()
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else "no GPU (dry run)"
    sections = [s for s in plan(args.out) if not args.only or s.name in args.only]
    dry = args.dry_run or not gpu
    gpus = max(1, torch.cuda.device_count()) if gpu else 1
    runnable = [s for s in sections if s.gpus <= gpus]
    budget = args.budget
    if budget is None:
        budget = ONE_GPU_BUDGET_S + sum(s.limit_s for s in runnable if s.gpus > 1)
    planned = sum(s.limit_s for s in runnable)
    if planned > budget:
        raise SystemExit(f"the sections' limits add up to {planned} s, over --budget {budget}")
    start = time.perf_counter()
    if not dry:
        WORK.mkdir(parents=True, exist_ok=True)
        one_block_arch()
        for section in sections:
            if section.name != "build" and any(
                s.name == "build" and s.status != "passed" for s in sections
            ):
                section.status = "skipped"  # nothing runs on a failed build
                continue
            if section.gpus > gpus:
                section.status = "skipped"
                section.log_tail = f"needs {section.gpus} GPUs, this machine has {gpus}"
                continue
            print(f"[gpu_suite] {section.name} (limit {section.limit_s} s)", flush=True)
            run_section(section, args.out)
            print(f"[gpu_suite] {section.name}: {section.status} in {section.seconds} s")
    summary = {
        "device": device,
        "torch": torch.__version__,
        "dry_run": dry,
        "wheels": wheels,
        "seconds": round(time.perf_counter() - start, 1),
        "sections": [asdict(s) for s in sections],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text(summary_markdown(device, sections))
    print((args.out / "summary.md").read_text())
    return 0 if dry or all(s.status == "passed" for s in sections) else 1


if __name__ == "__main__":
    raise SystemExit(main())
