"""Evaluate saved samples: diversity, fidelity, motion and (for mixtures) mode metrics, one row
per model.

    python -m phased_dmd_mp.evaluate SAMPLES [SAMPLES ...] --out DIR [--config FILE] [--set k=v]

SAMPLES are sample files (phased_dmd_mp/eval/samples.py) or, for videos, folders of video files
named c{condition}_s{seed}.mp4 (what `sample` writes to OUT/media/; NAME=FOLDER names the model)
or sample files of videos [conditions, seeds, C, F, H, W] (phased_dmd_mp/eval/videos.py). Inputs
naming the same model are its runs (training seeds), averaged with a 95% t-interval. Images are
compared with scikit-learn's digits, points with the Gaussian mixture their file (or the config)
specifies; videos are measured for motion (optical flow, VBench's dynamic degree with RAFT
weights) and for diversity over seeds frame by frame (eval/video_metrics.py). Writes
DIR/results.md, DIR/results.json (per-run and per-condition values too), DIR/grids/<model>.png
(videos: a strip of frames), DIR/comparison.png (models side by side) and DIR/config.yaml.
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
from phased_dmd_mp.eval.report import (
    VIDEO_COLUMNS,
    markdown_table,
    video_strip,
    save_comparison,
    save_grid,
    summarize,
)
from phased_dmd_mp.eval.motion import DISFlow, FlowError, RAFTFlow
from phased_dmd_mp.eval.samples import SampleFile, SampleFileError, load_sample_file
from phased_dmd_mp.eval.moving_digits import DigitFidelity
from phased_dmd_mp.eval.video_metrics import evaluate_videos
from phased_dmd_mp.eval.videos import (
    VideoSet,
    npz_samples_shape,
    open_video_folder,
    open_video_npz,
)

FEATURE_BATCH = 512
AUTO_EXTRACTOR = {"images": "digits", "points": "points"}
DIGITS_SHAPE = (1, 8, 8)  # channels, height, width of what the digits extractor was trained on


@dataclass(frozen=True)
class EvalConfig:
    # Feature extractor of the diversity and fidelity metrics: auto (the digits CNN for images
    # and for 8x8 gray video frames, the points themselves for points, none for other video
    # frames: their diversity is then not measured), a name in eval.extractors.EXTRACTORS, or
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
    # Videos: optical flow is OpenCV's DIS unless raft_weights names a file of torchvision's
    # RAFT-large weights (a state dict, e.g. Raft_Large_Weights.C_T_V1's), which VBench's
    # dynamic degree needs.
    raft_weights: str | None = None
    dynamic_degree: bool = False  # VBench's dynamic degree (%, needs raft_weights)
    diversity_frames: int = 8  # evenly spaced frames per video the diversity compares
    # Videos of the embedded moving digits (one digit on a -1 background, condition c = digit
    # c): also digit accuracy, shape change and digit speed of the tracked digit
    # (eval/moving_digits.py)
    digit_fidelity: bool = False

    def __post_init__(self):
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")
        if not self.coverage_radius > 0:
            raise ValueError(f"coverage_radius must be > 0, got {self.coverage_radius}")
        if self.mixture_reference_samples <= self.knn_k:
            raise ValueError("mixture_reference_samples must be > knn_k")
        if self.diversity_frames < 1:
            raise ValueError(f"diversity_frames must be >= 1, got {self.diversity_frames}")
        if self.dynamic_degree and self.raft_weights is None:
            raise ValueError(
                "dynamic_degree needs RAFT (VBench's rule is calibrated on its flow): give its "
                "weights with --set raft_weights=FILE (torchvision's raft_large state dict)"
            )
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


def _common_kind(files: list[SampleFile | VideoSet]) -> str:
    kinds = {file.kind for file in files}
    if len(kinds) > 1:
        raise EvaluationError(
            f"the inputs mix {' and '.join(sorted(kinds))}; evaluate them separately"
        )
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


def open_input(path: str | Path) -> SampleFile | VideoSet:
    """A sample file, a folder of videos (NAME=FOLDER names its model) or a sample file of
    videos; raises SampleFileError naming the file."""
    text = str(path)
    name, _, folder = text.partition("=")
    if "=" in text and not Path(text).exists() and name and folder:
        return open_video_folder(Path(folder), model=name)
    path = Path(path)
    if path.is_dir():
        return open_video_folder(path)
    shape = npz_samples_shape(path) if path.is_file() else None
    if shape is not None and len(shape) == 6:
        return open_video_npz(path)
    return load_sample_file(path)


def evaluate(paths: list[Path], config: EvalConfig, out_dir: Path, progress: bool = True) -> dict:
    """Evaluate every input, write the table, the JSON and the grids; return the JSON."""
    files = [open_input(path) for path in paths]
    kind = _common_kind(files)
    if kind == "videos":
        return _evaluate_videos(files, config, out_dir, progress)
    if any(value != default for value, default in _video_settings(config)):
        raise EvaluationError(
            "raft_weights, dynamic_degree, diversity_frames and digit_fidelity are for videos, not "
            f"{kind}: leave them out"
        )
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


def _video_settings(config: EvalConfig) -> list[tuple]:
    """(value, default) of the video-only keys."""
    defaults = EvalConfig.__dataclass_fields__
    keys = ("raft_weights", "dynamic_degree", "diversity_frames", "digit_fidelity")
    return [(getattr(config, key), defaults[key].default) for key in keys]


def _video_extractors(
    videos: list[VideoSet], config: EvalConfig
) -> tuple[FeatureExtractor | None, PerceptualDistance | None]:
    """The frame extractors the config names; "auto" is the digits network for 8x8 gray frames
    and none otherwise (motion needs none: the table says diversity was not measured)."""
    digits = all((v.channels, v.height, v.width) == DIGITS_SHAPE for v in videos)
    specs = {}
    for role in ("features", "perceptual"):
        spec = getattr(config, role)
        if spec == "auto":
            spec = "digits" if digits else None
        specs[role] = spec
    if specs["features"] is None and specs["perceptual"] is None:
        return None, None
    try:
        built = {spec: resolve(spec) for spec in set(specs.values()) if spec is not None}
        if specs["features"] is not None:
            check_role(built[specs["features"]], specs["features"], FeatureExtractor)
        if specs["perceptual"] is not None:
            check_role(built[specs["perceptual"]], specs["perceptual"], PerceptualDistance)
    except (TypeError, ValueError) as error:
        raise EvaluationError(str(error)) from error
    return built.get(specs["features"]), built.get(specs["perceptual"])


def _flow_estimators(config: EvalConfig):
    """(optical flow estimator, dynamic degree's RAFT or None)."""
    try:
        if config.raft_weights is None:
            return DISFlow(), None
        raft = RAFTFlow(config.raft_weights)
    except FlowError as error:
        raise EvaluationError(str(error)) from error
    return raft, raft if config.dynamic_degree else None


def _evaluate_videos(
    videos: list[VideoSet], config: EvalConfig, out_dir: Path, progress: bool
) -> dict:
    """Motion and diversity of every model's videos; the table, JSON and strips of frames."""
    if config.mixture() is not None:
        raise EvaluationError("the mixture_* config keys are for point samples, not videos")
    extractor, perceptual = _video_extractors(videos, config)
    flow, dynamic_flow = _flow_estimators(config)
    fidelity = None
    if config.digit_fidelity:
        digits = extractor if isinstance(extractor, DigitsExtractor) else None
        fidelity = DigitFidelity(digits or DigitsExtractor.load(progress=progress))
    runs, strips = [], {}
    for video_set in tqdm(videos, desc="evaluate", disable=not progress):
        try:
            run, strip = evaluate_videos(
                video_set, flow, dynamic_flow, extractor, perceptual,
                config.diversity_frames, config.seed, progress, fidelity,
            )  # fmt: skip
        except ValueError as error:  # an extractor refusing the frames
            if isinstance(error, SampleFileError):
                raise
            raise EvaluationError(f"{video_set.path}: {error}") from error
        runs.append(run)
        strips.setdefault(video_set.model, (video_set, run, strip))
    rows = summarize(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    panels = []
    for row in rows:
        video_set, run, strip = strips[row["model"]]
        panel = _strip_panel(video_set, run, strip)
        panels.append(panel)
        row["grid"] = f"grids/{_grid_name(row['model'], taken)}"
        save_grid(panel, out_dir / row["grid"], 0.0)
    if len(rows) > 1:
        save_comparison(panels, out_dir / "comparison.png", 0.0)
    results = {
        "kind": "videos",
        "flow": {"name": flow.name, "unit": "pixels per frame at each video's resolution"},
        "dynamic_degree": None if dynamic_flow is None else {"name": dynamic_flow.name},
        "features": None if extractor is None else _describe(extractor),
        "perceptual": None if perceptual is None else _describe(perceptual),
        "digit_fidelity": None if fidelity is None else _describe(fidelity.extractor),
        "config": dataclasses.asdict(config),
        "models": rows,
        "runs": runs,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(
        markdown_table(rows, runs, _video_preamble(results, runs), VIDEO_COLUMNS)
    )
    (out_dir / "config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    )
    return results


def _strip_panel(video_set: VideoSet, run: dict, strip: Tensor) -> SampleFile:
    """Seed 0 of the first conditions, frames left to right, as a mosaic panel."""
    labels = video_set.labels or [str(c) for c in range(video_set.conditions)]
    frames = run["video"]["diversity_frames"]
    return video_strip(f"{video_set.model} (seed 0)", strip, labels[: len(strip)], frames)


def _video_preamble(results: dict, runs: list[dict]) -> list[str]:
    sizes = sorted(
        {(run["video"]["frames"], run["video"]["height"], run["video"]["width"]) for run in runs}
    )
    shapes = ", ".join(f"{f} frames of {h}x{w}" for f, h, w in sizes)
    features, perceptual = results["features"], results["perceptual"]
    lines = [
        "# Video evaluation",
        "",
        f"- videos: {shapes}",
        f"- optical flow: {results['flow']['name']}; mean length of the flow vectors over all "
        "pixels and consecutive frame pairs, in pixels per frame at the video's resolution",
    ]
    if results["dynamic_degree"] is not None:
        lines.append(
            "- dynamic degree: VBench's rule on RAFT flow (frames at ~8 fps, top-5% flow per "
            "pair against 6 px x max(1, 8/fps) x short side / 256), % of videos dynamic"
        )
    else:
        lines.append(
            "- dynamic degree: not measured (needs --set raft_weights=FILE "
            "--set dynamic_degree=true)"
        )
    if features is None and perceptual is None:
        lines.append(
            "- diversity: not measured (no extractor for these frames: --set "
            "features=module:factory --set perceptual=module:factory)"
        )
    else:
        frames = results["config"]["diversity_frames"]
        names = [item["name"] for item in (features, perceptual) if item is not None]
        lines.append(
            f"- diversity: {' / '.join(dict.fromkeys(names))} on up to {frames} evenly spaced "
            "frames, "
            "frame against frame, mean over the seed pairs of each condition, averaged over "
            "conditions"
        )
    if results["digit_fidelity"] is not None:
        lines.append(
            "- digit accuracy, shape change, digit speed: the 8x8 window with the most ink in "
            "each frame (eval/moving_digits.py): % of frames the digits network calls the "
            "video's class; mean |difference| of consecutive windows (pixel values in [-1, 1]); "
            "pixels the window moves per frame"
        )
    lines.append("- ± is the half-width of the 95% t-interval over a model's runs")
    return lines


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
    parser.add_argument(
        "samples",
        nargs="+",
        type=Path,
        help=".npz sample files (images, points or videos), or folders of c{condition}_s{seed}.mp4 "
        "videos (NAME=FOLDER names the model)",
    )
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
