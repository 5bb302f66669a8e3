"""The paper's diversity comparison (Table 2) and its ablations, reproduced on the embedded teachers.

    python -m phased_dmd_mp.reproduce --out OUT [--suite configs/reproduce/digits.yaml ...]
                                      [--jobs N]

For each suite (a YAML file in configs/reproduce/): train its teacher, distill it with every
listed run x training seed under the same settings and generator-update budget, sample every
model for every condition x sample seeds (the teacher with its many steps and CFG), and evaluate
all of them in one table: diversity (mean pairwise cosine similarity of features, mean pairwise
perceptual distance), fidelity (Frechet distance, precision, recall; for mixtures mode coverage
and mass error), mean ± 95% t-interval over training seeds. Writes OUT/<suite>/eval/results.md
(+ json, grids, comparison.png) and OUT/report.md with every suite's table.

Jobs (a teacher, a run x seed, an evaluation) run --jobs at a time, each in its own process on
one CPU thread: these small models are bound by per-operation overhead, not arithmetic, so N
single-threaded jobs go N times as fast as one job on N threads, and a run's numbers do not depend
on the machine's core count. Each job writes its output to its own log file.

Work already done is kept: a teacher, run or sample file that exists is reused, so an
interrupted reproduction continues where it stopped (pass a new --out to start over). A failed
job does not stop the others; its suite is not evaluated and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from phased_dmd_mp import pretrain_distill, pretrain_teacher
from phased_dmd_mp.config import ConfigError, load_config
from phased_dmd_mp.distill import checkpoint
from phased_dmd_mp.distill.config import DistillConfig
from phased_dmd_mp.evaluate import EvalConfig, evaluate
from phased_dmd_mp.sample import generate, generator_source, teacher_source, write_samples

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SUITES = [ROOT / "configs/reproduce/digits.yaml", ROOT / "configs/reproduce/mixture.yaml"]


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # the table's row
    overrides: tuple[str, ...]  # DistillConfig keys of this run, on top of the suite's common ones


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    teacher_config: Path  # pretrain_teacher config
    common: tuple[str, ...]  # DistillConfig keys every run shares (budget, batch, learning rates)
    runs: tuple[Run, ...]
    seeds: tuple[int, ...]  # training seeds of every run
    sample_seeds: int  # samples per condition
    eval_overrides: tuple[str, ...]  # EvalConfig keys


def load_suite(path: Path) -> Suite:
    """Read and check a suite; every run's config is validated before anything trains."""
    if not path.is_file():
        raise ConfigError(f"suite {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(Suite)} - {"name"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
    try:
        runs = tuple(Run(r["name"], tuple(r.get("set", ()))) for r in values["runs"])
        suite = Suite(
            name=path.stem,
            teacher_config=ROOT / values["teacher_config"],
            common=tuple(values.get("common", ())),
            runs=runs,
            seeds=tuple(values["seeds"]),
            sample_seeds=int(values["sample_seeds"]),
            eval_overrides=tuple(values.get("eval_overrides", ())),
        )
    except (KeyError, TypeError) as error:
        raise ConfigError(f"{path}: missing or malformed entry {error}") from None
    if not runs or not suite.seeds:
        raise ConfigError(f"{path}: needs at least one run and one seed")
    if len({run.name for run in runs}) != len(runs):
        raise ConfigError(f"{path}: run names must be unique")
    for run in runs:
        try:
            load_config(DistillConfig, None, [*suite.common, *run.overrides])
        except ConfigError as error:
            raise ConfigError(f"{path}, run {run.name!r}: {error}") from None
    load_config(pretrain_teacher.TeacherConfig, suite.teacher_config)
    load_config(EvalConfig, None, list(suite.eval_overrides))
    return suite


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _run_dir(out: Path, run: Run, seed: int) -> Path:
    return out / "runs" / _slug(run.name) / f"seed{seed}"


def _samples(out: Path, run: Run | None, seed: int = 0) -> Path:
    if run is None:
        return out / "samples" / "teacher" / "samples.npz"
    return out / "samples" / _slug(run.name) / f"seed{seed}" / "samples.npz"


# The jobs: each runs in a worker process and leaves its result on disk.


def teacher_job(suite: Suite, out: Path) -> None:
    """Train the suite's teacher (unless done) and sample it."""
    teacher_dir = out / "teacher"
    if not (teacher_dir / "metrics.json").is_file():
        config = load_config(pretrain_teacher.TeacherConfig, suite.teacher_config)
        pretrain_teacher.run(config, teacher_dir, progress=False)
    path = _samples(out, None)
    if not path.is_file():
        source = teacher_source(teacher_dir)
        write_samples(path.parent, source, generate(source, suite.sample_seeds, False))


def run_job(suite: Suite, out: Path, run: Run, seed: int) -> None:
    """Distill one run x seed (resuming its checkpoints) and sample its generator."""
    run_dir = _run_dir(out, run, seed)
    if not (run_dir / "export" / "generator.json").is_file():
        resume = "--resume" if checkpoint.complete_steps(run_dir) else "--overwrite"
        args = ["--out", str(run_dir), "--no-progress", resume]
        for item in (*suite.common, *run.overrides, f"seed={seed}", f"teacher={out / 'teacher'}"):
            args += ["--set", item]
        try:
            code = pretrain_distill.main(args)
        except SystemExit as exit_info:  # argparse's error exit; its message is in the log
            code = exit_info.code
        if code != 0:
            raise RuntimeError(f"pretrain_distill exited with code {code}")
    path = _samples(out, run, seed)
    if not path.is_file():
        source = dataclasses.replace(generator_source(run_dir), name=run.name)
        write_samples(path.parent, source, generate(source, suite.sample_seeds, False))


def eval_job(suite: Suite, out: Path) -> None:
    """One table of the teacher and every run x seed."""
    files = [_samples(out, None)]
    data = out / "teacher" / pretrain_teacher.DATA_VIDEOS  # video teachers: the data's videos
    if data.is_file():
        files.insert(0, data)
    files += [_samples(out, run, seed) for run in suite.runs for seed in suite.seeds]
    config = load_config(EvalConfig, None, list(suite.eval_overrides))
    evaluate(files, config, out / "eval", progress=False)


def _init_worker() -> None:
    torch.set_num_threads(1)


def _logged(log: Path, job, *args) -> tuple[float, float]:
    """Run job(*args) with this process's stdout and stderr (C level too, and the traceback of a
    failure) appended to log; returns its minutes of wall-clock and of CPU time (the worker
    process's user + system time: on a shared machine the wall-clock grows, the CPU time not)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        with open(log, "a") as file:
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
            try:
                job(*args)
            except BaseException:
                traceback.print_exc()  # into the log: the parent only gets the exception
                raise
            return (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@dataclasses.dataclass
class _Job:
    suite: Suite
    kind: str  # "teacher", "run" or "evaluation"
    what: str  # for messages
    log: Path


def reproduce_all(
    suites: list[Suite], out: Path, jobs: int, progress: bool
) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Every suite's teacher, runs and evaluation, `jobs` at a time; a suite's runs start when
    its teacher is done and its evaluation when all its runs are. Returns each suite's
    job-minutes (wall-clock, CPU) and the failure messages."""
    minutes = {suite.name: (0.0, 0.0) for suite in suites}
    runs_left: dict[str, int] = {}
    failures: list[str] = []
    pending: dict[Future, _Job] = {}
    total = sum(2 + len(suite.runs) * len(suite.seeds) for suite in suites)
    bar = tqdm(total=total, desc="reproduce: jobs", disable=not progress)
    context = multiprocessing.get_context("spawn")  # a forked worker would share torch's state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool:

        def submit(suite: Suite, kind: str, what: str, log: Path, job, *args) -> None:
            future = pool.submit(_logged, log, job, suite, out / suite.name, *args)
            pending[future] = _Job(suite, kind, f"{suite.name}: {what}", log)

        for suite in suites:
            submit(suite, "teacher", "teacher", out / suite.name / "teacher.log", teacher_job)
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    suite = job.suite
                    bar.update()
                    if future.exception() is not None:
                        failures.append(f"{job.what} failed ({future.exception()}); log: {job.log}")
                        bar.write(failures[-1])
                        continue
                    spent = future.result()
                    minutes[suite.name] = tuple(a + b for a, b in zip(minutes[suite.name], spent))
                    if job.kind == "teacher":
                        runs_left[suite.name] = len(suite.runs) * len(suite.seeds)
                        for run in suite.runs:
                            for seed in suite.seeds:
                                log = _run_dir(out / suite.name, run, seed).with_suffix(".log")
                                what = f"run {run.name!r} seed {seed}"
                                submit(suite, "run", what, log, run_job, run, seed)
                    elif job.kind == "run":
                        runs_left[suite.name] -= 1
                        if runs_left[suite.name] == 0:
                            log = out / suite.name / "eval.log"
                            submit(suite, "evaluation", "evaluation", log, eval_job)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
    return minutes, failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.reproduce", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--suite",
        type=Path,
        nargs="+",
        default=DEFAULT_SUITES,
        metavar="YAML",
        help="suite files (configs/reproduce/*.yaml); each writes OUT/<file name>/ "
        "(default: the digits and mixture suites)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (relative to the current directory), e.g. results/runs; rerun "
        "with the same OUT to continue an interrupted reproduction",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count(),
        help="jobs at once, one CPU thread each (default: the number of CPUs)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (the per-job logs stay)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        suites = [load_suite(path) for path in args.suite]
    except ConfigError as error:
        parser.error(str(error))
    if len({suite.name for suite in suites}) != len(suites):
        parser.error("suites must have distinct file names (each names its output folder)")
    start = time.perf_counter()
    try:
        minutes, failures = reproduce_all(suites, args.out, args.jobs, not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue (finished work is reused)")
        return 130
    wall = (time.perf_counter() - start) / 60
    if failures:
        print("\n".join(["reproduction incomplete:", *failures]), file=sys.stderr)
        return 1
    sections = []
    for suite in suites:
        results = args.out / suite.name / "eval" / "results.md"
        sections.append(
            f"## {suite.name}\n\n{len(suite.runs)} runs x seeds {list(suite.seeds)}, "
            f"{suite.sample_seeds} samples per condition; common settings: "
            f"`{' '.join(suite.common)}`; {minutes[suite.name][0]:.1f} job-minutes "
            f"wall-clock, {minutes[suite.name][1]:.1f} CPU-minutes (one CPU thread each)."
            f"\n\n{results.read_text()}"
        )
    report = args.out / "report.md"
    report.write_text(
        f"# Reproduction\n\n{wall:.1f} minutes wall-clock, {args.jobs} jobs at once.\n\n"
        + "\n".join(sections)
    )
    print(f"{report.read_text()}\nwrote {report} in {wall:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
