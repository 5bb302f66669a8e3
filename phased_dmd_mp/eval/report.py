"""The comparison table (markdown and JSON rows, one per model) and sample grids (PNG)."""

from __future__ import annotations

from pathlib import Path

import torch

from phased_dmd_mp.eval.metrics import mean_confidence_interval
from phased_dmd_mp.eval.samples import SampleFile

# (metric key, column header); arrows say which way is better.
COLUMNS = [
    ("cosine_similarity", "cosine sim. ↓"),
    ("perceptual_distance", "perceptual dist. ↑"),
    ("frechet_distance", "FD ↓"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
]
MIXTURE_COLUMNS = [
    ("mode_coverage", "mode coverage ↑"),
    ("mass_error_mean", "mass error mean ↓"),
    ("mass_error_max", "mass error max ↓"),
    ("on_mode_fraction", "on-mode ↑"),
]
GRID_CONDITIONS, GRID_SEEDS = 10, 8  # images: the first rows and columns drawn
GRID_POINTS = 5000  # points: at most this many drawn
COMPARISON_COLUMNS = 4  # models per row of comparison.png


def summarize(runs: list[dict]) -> list[dict]:
    """Group per-file results by model (in order of first appearance): each metric's mean and
    95% t-interval half-width over the model's runs (None with a single run)."""
    models: dict[str, list[dict]] = {}
    for run in runs:
        models.setdefault(run["model"], []).append(run)
    rows = []
    for model, model_runs in models.items():
        metrics = {}
        for key in model_runs[0]["metrics"]:
            values = [run["metrics"][key] for run in model_runs]
            mean, half_width = mean_confidence_interval(values)
            metrics[key] = {"mean": mean, "ci95": half_width, "values": values}
        rows.append({"model": model, "runs": len(model_runs), "metrics": metrics})
    return rows


def _cell(metric: dict) -> str:
    if metric["ci95"] is None:
        return f"{metric['mean']:.4g}"
    return f"{metric['mean']:.4g} ± {metric['ci95']:.2g}"


def markdown_table(rows: list[dict], runs: list[dict], preamble: list[str]) -> str:
    columns = COLUMNS + (MIXTURE_COLUMNS if "mode_coverage" in rows[0]["metrics"] else [])
    shapes = {}
    for run in runs:
        shapes.setdefault(run["model"], set()).add(f"{run['conditions']} x {run['seeds']}")
    lines = [*preamble, ""]
    header = ["model", "runs", "conditions x seeds"] + [title for _, title in columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row["model"], str(row["runs"]), ", ".join(sorted(shapes[row["model"]]))]
        cells += [_cell(row["metrics"][key]) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_grid(sample_file: SampleFile, path: Path, coverage_radius: float) -> None:
    """Images: the first conditions (rows) by the first seeds (columns); points: a scatter of the
    samples (coloured by condition) over the mixture's modes and their coverage radius (in
    mixture stds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if sample_file.kind == "images":
        fig = _image_grid(plt, sample_file)
    else:
        fig = _point_scatter(plt, sample_file, coverage_radius)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_comparison(sample_files: list[SampleFile], path: Path, coverage_radius: float) -> None:
    """Every model's grid (images) or scatter (points) side by side, COMPARISON_COLUMNS to a
    row, e.g. the teacher at 40 steps next to each student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(COMPARISON_COLUMNS, len(sample_files))
    rows = -(-len(sample_files) // columns)
    if sample_files[0].kind == "images":
        mosaic_rows, mosaic_cols = _mosaic_size(sample_files[0])
        size = (0.5 * mosaic_cols + 0.6, 0.5 * mosaic_rows + 0.8)
    else:
        size = (3.9, 3.9)
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * size[0] + 0.6, rows * size[1]), squeeze=False
    )
    for ax, sample_file in zip(axes.flat, sample_files):
        if sample_file.kind == "images":
            _draw_mosaic(ax, sample_file)
        else:
            _draw_scatter(plt, ax, sample_file, coverage_radius)
    for ax in axes.flat[len(sample_files) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mosaic_size(sample_file: SampleFile) -> tuple[int, int]:
    return (
        min(GRID_CONDITIONS, sample_file.conditions),
        min(GRID_SEEDS, sample_file.seeds),
    )


def _draw_mosaic(ax, sample_file: SampleFile) -> None:
    """One mosaic (a single imshow: fast), images separated by a 1-pixel white border."""
    images = (sample_file.samples[:GRID_CONDITIONS, :GRID_SEEDS] + 1) / 2
    rows, cols, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (0, 1, 0, 1), value=1.0)  # [R, S, C, H+1, W+1]
    mosaic = padded.permute(0, 3, 1, 4, 2).reshape(rows * (height + 1), cols * (width + 1), -1)
    mosaic = mosaic[:, :, 0] if channels == 1 else mosaic[:, :, :3]
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([(col + 0.5) * (width + 1) - 1 for col in range(cols)], range(cols))
    labels = sample_file.labels[:rows] if sample_file.labels is not None else range(rows)
    ax.set_yticks([(row + 0.5) * (height + 1) - 1 for row in range(rows)], labels)
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("seed", fontsize=8)
    ax.set_ylabel("condition", fontsize=8)
    ax.set_title(sample_file.model, fontsize=9)


def _image_grid(plt, sample_file: SampleFile):
    rows, cols = _mosaic_size(sample_file)
    fig, ax = plt.subplots(figsize=(0.5 * cols + 1.2, 0.5 * rows + 0.8))
    _draw_mosaic(ax, sample_file)
    fig.tight_layout()
    return fig


def _point_scatter(plt, sample_file: SampleFile, coverage_radius: float):
    fig, ax = plt.subplots(figsize=(5, 5))
    _draw_scatter(plt, ax, sample_file, coverage_radius)
    fig.tight_layout()
    return fig


def _draw_scatter(plt, ax, sample_file: SampleFile, coverage_radius: float) -> None:
    points = sample_file.samples.flatten(0, 1)[:GRID_POINTS, :2].numpy()
    condition = torch.arange(sample_file.conditions).repeat_interleave(sample_file.seeds)
    condition = condition[:GRID_POINTS].numpy()
    ax.scatter(points[:, 0], points[:, 1], s=2, c=condition % 10, cmap="tab10", vmin=0, vmax=9)
    mixture = sample_file.mixture
    for x, y in mixture.means[:, :2].tolist():
        ax.add_patch(
            plt.Circle((x, y), coverage_radius * mixture.std, fill=False, lw=0.5, color="0.3")
        )
    ax.set_aspect("equal")
    ax.set_title(
        f"{sample_file.model}: {sample_file.conditions * sample_file.seeds} samples\n"
        f"circles: {coverage_radius:g} std around each mode",
        fontsize=9,
    )
