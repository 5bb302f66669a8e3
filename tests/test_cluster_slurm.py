"""scripts/slurm/: every script parses (bash -n) and names configs and modules that exist; the
distillation script, run with stand-ins for srun and scontrol, launches one c10d rendezvous
over the nodes through phased_dmd_mp.launch, resumes a run with a checkpoint, calls the
preflight when that module exists, and requeues after a pre-emption stop but not after a
failure; the prepare script starts one prepare rank per GPU of every node, with the user's
options."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_references_what_exists(script):
    assert shutil.which("bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for config in re.findall(r"configs/[\w./-]+\.yaml", text):
        assert (ROOT / config).is_file(), f"{script.name} names {config}"
    for module in re.findall(r"-m (phased_dmd_mp[\w.]*)", text):
        if module != "phased_dmd_mp.preflight":  # optional: called only when it exists
            assert importlib.util.find_spec(module), f"{script.name} runs {module}"


def test_every_shipped_recipe_has_its_layout_in_the_distill_script():
    text = (ROOT / "scripts" / "slurm" / "distill.sbatch").read_text()
    for config in sorted((ROOT / "configs").glob("*_phased_dmd.yaml")):
        assert f"configs/{config.name}" in text, f"no layout for {config.name}"


STANDINS = {
    # srun: record the command line; exit with $SRUN_STATUS.
    "srun": 'printf "%s\\n" "$@" > "$LOG/srun"; exit "${SRUN_STATUS:-0}"\n',
    "scontrol": (
        'if [ "$1" = show ]; then echo node-a; echo node-b; else echo "$@" >> "$LOG/scontrol"; fi\n'
    ),
    # nvidia-smi: each GPU's memory.total in MiB when $NVIDIA_SMI_MIB is set, else it fails.
    "nvidia-smi": (
        '[ -n "${NVIDIA_SMI_MIB:-}" ] || exit 9\n'
        'printf "%s\\n" "$NVIDIA_SMI_MIB" "$NVIDIA_SMI_MIB"\n'
    ),
    # python: record a preflight call, run everything else for real.
    "python": (
        'case "$*" in "-m phased_dmd_mp.preflight"*) echo "$@" > "$LOG/preflight"; exit 0;; esac\n'
        f'exec {sys.executable} "$@"\n'
    ),
}


def sbatch(tmp_path, run_dir, srun_status=0, script="distill.sbatch", arguments=None, env=None):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    shutil.rmtree(log, ignore_errors=True)
    log.mkdir()
    for name, body in STANDINS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "LOG": str(log),
        "SRUN_STATUS": str(srun_status),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_GPUS_ON_NODE": "8",
        **(env or {}),
    }
    if arguments is None:
        arguments = ["configs/wan2.1_t2v_14b_phased_dmd.yaml", str(run_dir), "teacher=/data/t"]
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm" / script), *arguments],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (log / "srun").exists(), (result.returncode, result.stdout, result.stderr)
    srun = (log / "srun").read_text().split("\n")
    requeued = (log / "scontrol").read_text() if (log / "scontrol").exists() else ""
    return result, srun, requeued, log


def test_distill_script_launches_resumes_and_requeues(tmp_path):
    run = tmp_path / "run"
    result, srun, requeued, log = sbatch(tmp_path, run)
    assert result.returncode == 0, result.stderr
    assert srun[srun.index("python") :][:3] == ["python", "-m", "phased_dmd_mp.launch"]
    for argument in (
        "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-id=4242",
        "--rdzv-endpoint=node-a:29742", "phased_dmd_mp.pretrain_distill", "teacher=/data/t",
    ):  # fmt: skip
        assert argument in srun
    assert "--resume" not in srun
    assert f"--output={run}/logs/%j-node%n.out" in srun
    assert requeued == "requeue 4242\n"  # exit 0 without an export: pre-empted, continue
    preflight = importlib.util.find_spec("phased_dmd_mp.preflight") is not None
    assert (log / "preflight").exists() == preflight
    if preflight:
        # with the overrides (they may name the teacher) and this node's memory for offload
        call = (log / "preflight").read_text()
        assert "--world-size 16 --gpus-per-node 8 --gpu-memory 80GiB --host-memory " in call
        assert call.split("--host-memory ")[1].split()[0].endswith("KiB")
        assert call.rstrip().endswith("--set teacher=/data/t")
        # the GPU's memory as nvidia-smi reports it (80GiB where it cannot tell)
        sbatch(tmp_path, run, env={"NVIDIA_SMI_MIB": "81559"})
        assert "--gpu-memory 81559MiB --host-memory " in (log / "preflight").read_text()

    (run / "checkpoints" / "step-00000050").mkdir(parents=True)
    result, srun, requeued, _ = sbatch(tmp_path, run)
    assert "--resume" in srun

    result, srun, requeued, _ = sbatch(tmp_path, run, srun_status=3)
    assert result.returncode == 3 and requeued == ""  # a failure needs a look: no requeue

    (run / "export").mkdir()
    (run / "export" / "generator.json").write_text("{}")
    result, srun, requeued, _ = sbatch(tmp_path, run)
    assert result.returncode == 0 and requeued == ""  # finished


def test_each_recipe_has_exactly_one_layout_row():
    text = (ROOT / "scripts" / "slurm" / "distill.sbatch").read_text()
    rows = re.findall(r"^#\s+(configs/\S+\.yaml)\s+\d+ x \d+", text, re.MULTILINE)
    assert len(rows) == len(set(rows)), f"duplicate layout rows: {rows}"


def test_prepare_script_starts_one_prepare_rank_per_gpu_of_every_node(tmp_path):
    out = tmp_path / "teacher"
    arguments = ["/data/Wan2.2", "/data/prompts.txt", str(out), "--height", "480", "--online"]
    result, srun, requeued, _ = sbatch(tmp_path, out, script="prepare.sbatch", arguments=arguments)
    assert result.returncode == 0, result.stderr
    torchrun = srun[srun.index("python") :]
    assert torchrun[:3] == ["python", "-m", "torch.distributed.run"]
    for argument in (
        "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-id=4242",
        "--rdzv-endpoint=node-a:29742", "--max-restarts=0",
    ):  # fmt: skip
        assert argument in torchrun
    prepare = torchrun[torchrun.index("phased_dmd_mp.prepare") + 1 :]
    assert prepare[:6] == ["--pipeline", "/data/Wan2.2", "--prompts", "/data/prompts.txt",
                           "--out", str(out)]  # fmt: skip
    assert prepare[6:] == ["--height", "480", "--online", ""]  # "" = the record's last newline
    assert f"--output={out}/logs/%j-node%n.out" in srun and requeued == ""
