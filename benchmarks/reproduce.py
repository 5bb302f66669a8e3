"""The paper's diversity comparison (Table 2) and its ablations, reproduced on the embedded teachers.

    python benchmarks/reproduce.py [--suite configs/reproduce/digits.yaml ...] [--out results/runs]

For each suite (a YAML file in configs/reproduce/): train its teacher, distill it with every
listed run x training seed under the same settings and generator-update budget, sample every
model for every condition x sample seeds (the teacher with its many steps and CFG), and evaluate
all of them in one table: diversity (mean pairwise cosine similarity of features, mean pairwise
perceptual distance), fidelity (Frechet distance, precision, recall; for mixtures mode coverage
and mass error), mean ± 95% t-interval over training seeds. Writes OUT/<suite>/eval/results.md
(+ json, grids, comparison.png) and OUT/report.md with every suite's table.

Work already done is kept: a teacher, run or sample file that exists is reused, so an
interrupted reproduction continues where it stopped (pass a new --out to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

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


def reproduce(suite: Suite, out: Path, progress: bool) -> Path:
    """Teacher, runs, samples and evaluation of one suite; returns its results.md."""
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / "teacher"
    if not (teacher_dir / "metrics.json").is_file():
        config = load_config(pretrain_teacher.TeacherConfig, suite.teacher_config)
        pretrain_teacher.run(config, teacher_dir, progress)

    sample_files = [out / "samples" / "teacher" / "samples.npz"]
    if not sample_files[0].is_file():
        source = teacher_source(teacher_dir)
        write_samples(sample_files[0].parent, source, generate(source, suite.sample_seeds, False))

    jobs = [(run, seed) for run in suite.runs for seed in suite.seeds]
    for run, seed in tqdm(jobs, desc=f"{suite.name}: distill and sample", disable=not progress):
        run_dir = out / "runs" / _slug(run.name) / f"seed{seed}"
        if not (run_dir / "export" / "generator.json").is_file():
            resume = "--resume" if checkpoint.complete_steps(run_dir) else "--overwrite"
            args = ["--out", str(run_dir), "--no-progress", resume]
            for item in (*suite.common, *run.overrides, f"seed={seed}", f"teacher={teacher_dir}"):
                args += ["--set", item]
            if pretrain_distill.main(args) != 0:
                raise RuntimeError(f"run {run.name!r} seed {seed} failed")
        path = out / "samples" / _slug(run.name) / f"seed{seed}" / "samples.npz"
        if not path.is_file():
            source = dataclasses.replace(generator_source(run_dir), name=run.name)
            write_samples(path.parent, source, generate(source, suite.sample_seeds, False))
        sample_files.append(path)

    config = load_config(EvalConfig, None, list(suite.eval_overrides))
    evaluate(sample_files, config, out / "eval", progress)
    return out / "eval" / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/reproduce.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--suite", type=Path, nargs="+", default=DEFAULT_SUITES)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        suites = [load_suite(path) for path in args.suite]
    except ConfigError as error:
        parser.error(str(error))
    start = time.perf_counter()
    sections = []
    for suite in suites:
        suite_start = time.perf_counter()
        results = reproduce(suite, args.out / suite.name, not args.no_progress)
        minutes = (time.perf_counter() - suite_start) / 60
        settings = " ".join(suite.common)
        sections.append(
            f"## {suite.name}\n\n{len(suite.runs)} runs x seeds {list(suite.seeds)}, "
            f"{suite.sample_seeds} samples per condition; common settings: `{settings}`; "
            f"{minutes:.1f} minutes.\n\n{results.read_text()}"
        )
    report = args.out / "report.md"
    report.write_text("# Reproduction\n\n" + "\n".join(sections))
    print(f"{report.read_text()}\nwrote {report} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
