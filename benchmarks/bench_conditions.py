"""Condition sets at scale, on tiny random diffusers pipelines (tests/tiny_pipelines.py), CPU.

    python benchmarks/bench_conditions.py [--small 1000] [--large 100000] [--bytes-prompts 2000]
                                          [--batch 8] [--rounds 5] [--workdir DIR]
                                          [--json FILE]

Three measurements, each a ratio within this run:

1. bytes on disk per prompt (Wan2.2 T2V, `--bytes-prompts` short prompts): the real-token set
   `python -m phased_dmd_mp.prepare` writes (bf16) against the same prompts padded to 512
   tokens as version 1 sets stored them (float32 from a CPU encoder, bf16 from a GPU one; one
   shard per batch of 16);
2. scale (Qwen-Image, the cheaper tiny encoder): `--small` against `--large` prompts: prepare
   time and disk per prompt, and the runner's start-up (open the set; make the sampler, draw
   and read the first batch and its negative) time, wall and CPU, and resident memory, each in
   a fresh process after its imports, `--rounds` of each set interleaved (medians);
3. online encoding (Wan2.2 and Qwen-Image): a rank batch of `--batch` prompts encoded by an
   online set against read from the cached set.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_pipelines: real pipeline folders, random weights

SIZE = ["--height", "32", "--width", "32"]


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def short_prompts(count: int, seed: int = 0) -> list[str]:
    """3-9 words each from the tiny tokenizers' vocabulary (T5: ~5-11 tokens with </s>)."""
    from tiny_pipelines import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(count)]


def pipeline(workdir: Path, kind: str) -> Path:
    from tiny_pipelines import BUILDERS

    folder = workdir / kind
    if not (folder / "model_index.json").is_file():
        BUILDERS[kind](folder)
    return folder


def run_prepare(workdir: Path, kind: str, prompts: list[str], name: str, *extra: str):
    """(teacher directory, wall seconds of prepare.main, imports excluded)."""
    from phased_dmd_mp import prepare

    prompt_file = workdir / f"{name}.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    frames = ["--frames", "5"] if kind != "qwen_image" else []
    args = ["--pipeline", str(pipeline(workdir, kind)), "--prompts", str(prompt_file)]
    start = time.perf_counter()
    code = prepare.main([*args, "--out", str(out), "--no-progress", *SIZE, *frames, *extra])
    assert code == 0
    return out, time.perf_counter() - start


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def bytes_per_prompt(workdir: Path, count: int) -> dict:
    import torch

    from phased_dmd_mp.data.condition_writer import ConditionSetWriter
    from phased_dmd_mp.data.conditions import ConditionSet

    teacher, _ = run_prepare(workdir, "wan22_t2v", short_prompts(count), "bytes")
    conditions = ConditionSet(teacher / "conditions")
    out = {"prompts": count, "real_bf16": disk_bytes(teacher / "conditions") / count}
    lengths = []
    for dtype, key in ((torch.float32, "padded_float32"), (torch.bfloat16, "padded_bf16")):
        path = workdir / f"bytes_{key}"
        shutil.rmtree(path, ignore_errors=True)
        item_bytes = 512 * 16 * dtype.itemsize
        uncond = {"text": conditions.uncond(1).text[0].to(dtype)}
        with ConditionSetWriter(path, uncond, shard_bytes=16 * item_bytes) as writer:
            for start in range(0, count, 16):
                text = conditions.batch(range(start, min(start + 16, count))).text
                if dtype == torch.float32:
                    lengths += ((text.abs().amax(-1) > 0).sum(1)).tolist()
                writer.add(text=text.to(dtype))
        out[key] = disk_bytes(path) / count
    out["mean_tokens"] = statistics.mean(lengths)
    return out


STARTUP = """
import json, sys, time
sys.path.insert(0, {bench!r})
from bench_conditions import rss_bytes
from phased_dmd_mp.data.conditions import ConditionSampler, open_conditions
clocks = (time.perf_counter, time.process_time)
rss, start = rss_bytes(), [clock() for clock in clocks]
conditions = open_conditions({path!r})
opened, rss_opened = [clock() for clock in clocks], rss_bytes()
sampler = ConditionSampler(len(conditions), {batch}, seed=0)
cond = conditions.batch(next(sampler))
uncond = conditions.uncond({batch}, like=cond)
drawn, rss_drawn = [clock() for clock in clocks], rss_bytes()
for _ in range(20):
    conditions.batch(next(sampler))
done = [clock() for clock in clocks]
print(json.dumps({{
    "open_s": [b - a for a, b in zip(start, opened)],
    "first_batch_s": [b - a for a, b in zip(opened, drawn)],
    "batch_s": [(b - a) / 20 for a, b in zip(drawn, done)],
    "rss_open_bytes": rss_opened - rss, "rss_bytes": rss_drawn - rss,
}}))
"""


def startup(path: Path, batch: int) -> dict:
    """Start-up time ([wall, CPU] seconds) and resident memory of a runner opening `path`, in a
    fresh process."""
    code = STARTUP.format(bench=str(Path(__file__).parent), path=str(path), batch=batch)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def scale(workdir: Path, small: int, large: int, batch: int, rounds: int) -> dict:
    """Per set: prepare time and disk per prompt, then `rounds` start-ups of each set, the
    sets interleaved; medians."""
    out, teachers = {}, {}
    for name, count in (("small", small), ("large", large)):
        teacher, seconds = run_prepare(workdir, "qwen_image", short_prompts(count, 1), name)
        teachers[name] = teacher
        out[name] = {
            "prompts": count,
            "prepare_s_per_prompt": seconds / count,
            "disk_bytes_per_prompt": disk_bytes(teacher / "conditions") / count,
        }
    runs = {name: [] for name in teachers}
    for _ in range(rounds):
        for name, teacher in teachers.items():
            runs[name].append(startup(teacher / "conditions", batch))
    for name, measured in runs.items():
        for key in measured[0]:
            values = [m[key] for m in measured]
            if isinstance(values[0], list):  # [wall, cpu]
                out[name][key] = [statistics.median(v[i] for v in values) for i in (0, 1)]
            else:
                out[name][key] = statistics.median(values)
    return out


def online_cost(workdir: Path, batch: int, rounds: int = 20) -> dict:
    """CPU seconds per rank batch (this process's, one thread: the machine's load does not
    count): online encoding vs a cached read, interleaved, median."""
    from phased_dmd_mp.data.conditions import ConditionSampler, ConditionSet
    from phased_dmd_mp.data.online import OnlineConditionSet

    out = {}
    for kind in ("wan22_t2v", "qwen_image"):
        prompts = short_prompts(256, 2)
        cached_dir, _ = run_prepare(workdir, kind, prompts, f"cached_{kind}")
        online_dir, _ = run_prepare(workdir, kind, prompts, f"online_{kind}", "--online")
        cached = ConditionSet(cached_dir / "conditions")
        online = OnlineConditionSet(online_dir / "conditions", device="cpu")
        sampler = ConditionSampler(len(prompts), batch, seed=0)
        times = {"online": [], "cached": []}
        for _ in range(rounds):
            indices = next(sampler)
            for name, conditions in (("online", online), ("cached", cached)):
                start = time.process_time()
                conditions.batch(indices)
                times[name].append(time.process_time() - start)
        out[kind] = {name: statistics.median(values) for name, values in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--bytes-prompts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8, help="a data-parallel rank's batch")
    parser.add_argument("--rounds", type=int, default=5, help="start-ups of each set")
    parser.add_argument("--workdir", type=Path, help="keep the sets here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_conditions_"))
    workdir.mkdir(parents=True, exist_ok=True)

    sizes = bytes_per_prompt(workdir, args.bytes_prompts)
    print(
        f"\n## Bytes on disk per prompt (Wan2.2 T2V tiny, {sizes['prompts']} short prompts, "
        f"{sizes['mean_tokens']:.1f} real tokens on average of 512)\n\n"
        "| set | bytes per prompt | real-token set / it |\n|---|---|---|"
    )
    for key, label in (
        ("padded_float32", "512 tokens, float32 (version 1 from a CPU encoder)"),
        ("padded_bf16", "512 tokens, bf16 (version 1 from a GPU encoder)"),
        ("real_bf16", "real tokens, bf16 (this prepare)"),
    ):
        print(f"| {label} | {sizes[key]:,.0f} | {sizes['real_bf16'] / sizes[key]:.4f} |")

    grown = scale(workdir, args.small, args.large, args.batch, args.rounds)
    small, large = grown["small"], grown["large"]
    print(
        f"\n## Scale (Qwen-Image tiny, {small['prompts']:,} vs {large['prompts']:,} prompts, "
        f"rank batch {args.batch}; start-ups: median of {args.rounds} fresh processes each, "
        f"interleaved)\n\n| measure | {small['prompts']:,} | {large['prompts']:,} | "
        "ratio |\n|---|---|---|---|"
    )
    rows = [
        ("prepare wall time per prompt (ms)", small["prepare_s_per_prompt"] * 1e3,
         large["prepare_s_per_prompt"] * 1e3),
        ("disk per prompt (bytes)", small["disk_bytes_per_prompt"], large["disk_bytes_per_prompt"]),
    ]  # fmt: skip
    for key, label in (
        ("open_s", "runner: open the set"),
        ("first_batch_s", "runner: sampler + first batch and negative"),
        ("batch_s", "runner: a later batch"),
    ):
        for clock, index in (("wall", 0), ("CPU", 1)):
            values = small[key][index] * 1e3, large[key][index] * 1e3
            rows.append((f"{label}, {clock} (ms)", *values))
    for key, label in (
        ("rss_open_bytes", "runner: resident memory after opening (MiB)"),
        ("rss_bytes", "runner: resident memory after the first batch (MiB)"),
    ):
        rows.append((label, small[key] / 2**20, large[key] / 2**20))
    for label, a, b in rows:
        print(f"| {label} | {a:,.2f} | {b:,.2f} | {b / a:.2f} |")

    cost = online_cost(workdir, args.batch)
    print(
        f"\n## Online encoding, one rank batch of {args.batch} (CPU time, 1 thread)\n\n"
        "| pipeline | online encode (ms) | cached read (ms) | online / cached |\n|---|---|---|---|"
    )
    for kind, times in cost.items():
        print(
            f"| {kind} | {times['online'] * 1e3:.1f} | {times['cached'] * 1e3:.2f} | "
            f"{times['online'] / times['cached']:.0f}x |"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\n(workdir {workdir}; this process peaked at {peak:.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps({"bytes": sizes, "scale": grown, "online": cost}, indent=2))


if __name__ == "__main__":
    main()
