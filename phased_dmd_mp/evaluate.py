"""Evaluate saved samples: diversity, fidelity and (for mixtures) mode metrics, one row per model.

    python -m phased_dmd_mp.evaluate RUN.npz [RUN.npz ...] --out DIR [--config FILE] [--set k=v]

Sample files follow phased_dmd_mp/eval/samples.py; files naming the same model are its runs
(training seeds), averaged with a 95% t-interval. Images are compared with scikit-learn's digits,
points with the Gaussian mixture their file (or the config) specifies. Writes DIR/results.md,
DIR/results.json (per-run and per-condition values too), DIR/grids/<model>.png,
DIR/comparison.png (image models side by side) and DIR/config.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from phased_dmd_mp.config import ConfigError, add_config_arguments, load_config
from phased_dmd_mp.eval.digits import DigitsExtractor, load_digits_images
from phased_dmd_mp.eval.extractors import FeatureExtractor, PerceptualDistance, check_role, resolve
from phased_dmd_mp.eval.metrics import (
    cosine_diversity,
    frechet_distance,
    perceptual_diversity,
    precision_recall,
)
from phased_dmd_mp.eval.mixture import Mixture, mode_statistics
from phased_dmd_mp.eval.report import markdown_table, save_comparison, save_grid, summarize
from phased_dmd_mp.eval.samples import SampleFile, SampleFileError, load_sample_file

FEATURE_BATCH = 512
AUTO_EXTRACTOR = {"images": "digits", "points": "points"}
DIGITS_SHAPE = (1, 8, 8)  # channels, height, width of what the digits extractor was trained on


@dataclass(frozen=True)
class EvalConfig:
    # Feature extractor of the diversity and fidelity metrics: auto (the digits CNN for images,
    # the points themselves for points), a name in eval.extractors.EXTRACTORS, or
    # package.module:factory (docs/evaluation.md).
    features: str = "auto"
    perceptual: str = "auto"  # perceptual distance, chosen the same way
    knn_k: int = 3  # precision/recall neighbourhood (Kynkaanniemi et al. use 3)
    coverage_radius: float = 3.0  # in mixture stds; farther from every mode = off-mode
    mixture_reference_samples: int = 10000  # real draws from the mixture for FD and P/R
    # The mixture of point files that do not carry one (their own takes precedence): means
    # [modes, D]; give all three mixture_* keys or none.
    mixture_means: tuple[tuple[float, ...], ...] | None = None
    mixture_weights: tuple[float, ...] | None = None  # one per mode
    mixture_std: float | None = None  # of every mode
    seed: int = 0  # real-data draws and the subsampling for precision/recall

    def __post_init__(self):
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")
        if not self.coverage_radius > 0:
            raise ValueError(f"coverage_radius must be > 0, got {self.coverage_radius}")
        if self.mixture_reference_samples <= self.knn_k:
            raise ValueError("mixture_reference_samples must be > knn_k")
        given = [self.mixture_means, self.mixture_weights, self.mixture_std]
        if any(value is None for value in given) and any(value is not None for value in given):
            raise ValueError("give all of mixture_means, mixture_weights, mixture_std or none")
        self.mixture()  # validates the mixture

    def mixture(self) -> Mixture | None:
        if self.mixture_means is None:
            return None
        return Mixture.from_values(self.mixture_means, self.mixture_weights, self.mixture_std)


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together (kinds, mixtures, extractors)."""


def _common_kind(files: list[SampleFile]) -> str:
    kinds = {file.kind for file in files}
    if len(kinds) > 1:
        raise EvaluationError("the sample files mix images and points; evaluate them separately")
    return kinds.pop()


def _with_mixtures(files: list[SampleFile], config: EvalConfig) -> tuple[list[SampleFile], Mixture]:
    """Give every point file its mixture (its own or the config's); all must agree."""
    default = config.mixture()
    resolved = []
    for file in files:
        mixture = file.mixture or default
        if mixture is None:
            raise EvaluationError(
                f"{file.path}: point samples need a mixture: put mixture_means, mixture_weights "
                "and mixture_std in the file or in the config"
            )
        resolved.append(dataclasses.replace(file, mixture=mixture))
    if not all(file.mixture.same_as(resolved[0].mixture) for file in resolved):
        raise EvaluationError("the sample files describe different mixtures; compare them apart")
    return resolved, resolved[0].mixture


def _check_digits_shape(files: list[SampleFile], config: EvalConfig) -> None:
    """The automatic extractor knows the 8x8 gray digits only: other images (a Wan or
    Qwen-Image model's frames) would be squeezed into it and scored as if they were digits."""
    if "auto" not in (config.features, config.perceptual):
        return
    for file in files:
        shape = tuple(file.samples.shape[2:])
        if shape != DIGITS_SHAPE:
            raise EvaluationError(
                f"{file.path}: images {list(shape)} are not the 8x8 gray digits the default "
                "extractor knows; plug in one for them with --set features=module:factory --set "
                "perceptual=module:factory (docs/evaluation.md, phased_dmd_mp/eval/extractors.py)"
            )


def _extractors(config: EvalConfig, kind: str) -> tuple[FeatureExtractor, PerceptualDistance]:
    specs = {
        "features": AUTO_EXTRACTOR[kind] if config.features == "auto" else config.features,
        "perceptual": AUTO_EXTRACTOR[kind] if config.perceptual == "auto" else config.perceptual,
    }
    try:
        built = {spec: resolve(spec) for spec in set(specs.values())}  # one object if both agree
        check_role(built[specs["features"]], specs["features"], FeatureExtractor)
        check_role(built[specs["perceptual"]], specs["perceptual"], PerceptualDistance)
    except (TypeError, ValueError) as error:
        raise EvaluationError(str(error)) from error
    return built[specs["features"]], built[specs["perceptual"]]


def _describe(extractor: object) -> dict:
    if isinstance(extractor, DigitsExtractor):
        return {"name": extractor.name, "test_accuracy": extractor.test_accuracy}
    return {"name": extractor.name}


def extract(extractor: FeatureExtractor, samples: Tensor, progress: bool, desc: str) -> Tensor:
    """Features [N, F] (float64) of samples [N, ...], in batches."""
    batches = samples.split(FEATURE_BATCH)
    features = []
    for batch in tqdm(batches, desc=desc, disable=not progress or len(batches) < 2, leave=False):
        try:
            output = extractor.features(batch)
        except ValueError as error:
            raise EvaluationError(f"{extractor.name}: {error}") from error
        if output.ndim != 2 or len(output) != len(batch):
            raise EvaluationError(
                f"{extractor.name} returned features of shape {tuple(output.shape)} for "
                f"{len(batch)} samples; expected [{len(batch)}, F]"
            )
        features.append(output.double())
    return torch.cat(features)


def _matched_subsets(real: Tensor, fake: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Equally many real and fake rows (a seeded random subset of the larger set)."""
    n = min(len(real), len(fake))
    generator = torch.Generator().manual_seed(seed)
    return (
        real[torch.randperm(len(real), generator=generator)[:n]],
        fake[torch.randperm(len(fake), generator=generator)[:n]],
    )


def evaluate_run(
    file: SampleFile,
    extractor: FeatureExtractor,
    perceptual: PerceptualDistance,
    real_features: Tensor,
    config: EvalConfig,
    progress: bool = True,
) -> dict:
    """All metrics of one sample file against the real features."""
    flat = file.samples.flatten(0, 1)
    features = extract(extractor, flat, progress, f"{extractor.name} features")
    if features.shape[1] != real_features.shape[1]:
        raise EvaluationError(
            f"{file.path}: {extractor.name} gives {features.shape[1]} features per sample, the "
            f"reference {real_features.shape[1]}: an extractor must map every image size to the "
            "same features"
        )
    cosine = cosine_diversity(features.view(file.conditions, file.seeds, -1))
    try:
        distance = perceptual_diversity(file.samples, perceptual, progress, config.seed)
    except ValueError as error:
        raise EvaluationError(f"{perceptual.name}: {error}") from error
    real_subset, fake_subset = _matched_subsets(real_features, features, config.seed)
    if len(fake_subset) <= config.knn_k:
        raise EvaluationError(
            f"{file.path}: precision/recall with knn_k = {config.knn_k} needs more than "
            f"{config.knn_k} samples, got {len(fake_subset)}"
        )
    precision, recall = precision_recall(real_subset, fake_subset, config.knn_k)
    metrics = {
        "cosine_similarity": float(cosine.mean()),
        "perceptual_distance": float(distance.mean()),
        "frechet_distance": frechet_distance(features, real_features),
        "precision": precision,
        "recall": recall,
    }
    run = {
        "model": file.model,
        "file": str(file.path),
        "conditions": file.conditions,
        "seeds": file.seeds,
        "metrics": metrics,
        "per_condition": {
            "labels": file.labels,
            "cosine_similarity": cosine.tolist(),
            "perceptual_distance": distance.tolist(),
        },
        "precision_recall_samples": len(fake_subset),
    }
    if file.kind == "points":
        statistics = mode_statistics(flat, file.mixture, config.coverage_radius)
        run["mode_fractions"] = statistics.pop("mode_fractions")
        metrics.update(statistics)
    return run


def _grid_name(model: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"
    name, index = stem, 2
    while name in taken:
        name, index = f"{stem}-{index}", index + 1
    taken.add(name)
    return f"{name}.png"


def evaluate(paths: list[Path], config: EvalConfig, out_dir: Path, progress: bool = True) -> dict:
    """Evaluate every sample file, write the table, the JSON and the grids; return the JSON."""
    files = [load_sample_file(path) for path in paths]
    kind = _common_kind(files)
    if kind == "images":
        _check_digits_shape(files, config)
    extractor, perceptual = _extractors(config, kind)
    if kind == "points":
        files, mixture = _with_mixtures(files, config)
        real = mixture.sample(config.mixture_reference_samples, config.seed)
        reference = {"name": "Gaussian mixture", "samples": len(real), **mixture.to_json()}
    else:
        if config.mixture() is not None:
            raise EvaluationError("the mixture_* config keys are for point samples, not images")
        real = load_digits_images()[0]
        reference = {"name": "scikit-learn digits", "samples": len(real)}
    real_features = extract(extractor, real, progress, "real features")
    runs = [
        evaluate_run(file, extractor, perceptual, real_features, config, progress)
        for file in tqdm(files, desc="evaluate", disable=not progress)
    ]
    rows = summarize(runs)

    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for row in rows:
        first = next(file for file in files if file.model == row["model"])
        row["grid"] = f"grids/{_grid_name(row['model'], taken)}"
        save_grid(first, out_dir / row["grid"], config.coverage_radius)
    if len(rows) > 1:
        save_comparison(
            [next(f for f in files if f.model == row["model"]) for row in rows],
            out_dir / "comparison.png",
            config.coverage_radius,
        )
    results = {
        "kind": kind,
        "features": _describe(extractor),
        "perceptual": _describe(perceptual),
        "reference": reference,
        "config": dataclasses.asdict(config),
        "models": rows,
        "runs": runs,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(rows, runs, _preamble(results)))
    (out_dir / "config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    )
    return results


def _preamble(results: dict) -> list[str]:
    features, perceptual, reference = (results[k] for k in ("features", "perceptual", "reference"))
    accuracy = features.get("test_accuracy")
    trained = f" (digits test accuracy {accuracy:.1%})" if accuracy is not None else ""
    proxy = " (LPIPS-like proxy, not LPIPS)" if perceptual["name"] == DigitsExtractor.name else ""
    k = results["config"]["knn_k"]
    return [
        "# Sample evaluation",
        "",
        f"- features: {features['name']}{trained}",
        f"- perceptual distance: {perceptual['name']}{proxy}",
        f"- reference: {reference['name']}, {reference['samples']} samples",
        "- diversity: mean over the seed pairs of each condition, averaged over conditions",
        f"- FD and precision/recall (k = {k}, equal real and generated counts) pool all samples",
        "- ± is the half-width of the 95% t-interval over a model's runs",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("samples", nargs="+", type=Path, help=".npz sample files")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    add_config_arguments(parser, EvalConfig, "knn_k=5")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = parser.parse_args(argv)
    if (args.out / "results.json").exists() and not args.overwrite:
        parser.error(f"{args.out} already holds results; pass --overwrite or choose another --out")
    try:
        config = load_config(EvalConfig, args.config, args.overrides)
        evaluate(args.samples, config, args.out)
    except (ConfigError, SampleFileError, EvaluationError) as error:
        parser.error(str(error))
    print(
        (args.out / "results.md").read_text()
        + f"\nwrote {args.out}/results.md, results.json, grids/ (and comparison.png for several models)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
