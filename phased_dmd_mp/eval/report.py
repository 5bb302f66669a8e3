"""The comparison table (markdown and JSON rows, one per model) and sample grids (PNG)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

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
VIDEO_COLUMNS = [
    ("optical_flow", "optical flow (px/frame) ↑"),
    ("dynamic_degree", "dynamic degree % ↑"),
    ("digit_speed", "digit speed (px/frame)"),
    ("cosine_similarity", "cosine sim. ↓"),
    ("perceptual_distance", "perceptual dist. ↑"),
    ("digit_accuracy", "digit accuracy % ↑"),
    ("shape_change", "shape change ↓"),
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


def markdown_table(
    rows: list[dict], runs: list[dict], preamble: list[str], columns: list | None = None
) -> str:
    """The table: `columns` (default: the image and mixture ones) that the rows measured."""
    if columns is None:
        columns = COLUMNS + (MIXTURE_COLUMNS if "mode_coverage" in rows[0]["metrics"] else [])
    columns = [(key, title) for key, title in columns if key in rows[0]["metrics"]]
    shapes, sizes = {}, {}
    for run in runs:
        shapes.setdefault(run["model"], set()).add(f"{run['conditions']} x {run['seeds']}")
        if "video" in run:  # the size the optical flow's pixels are measured at
            video = run["video"]
            size = f"{video['frames']} frames, {video['height']}x{video['width']}"
            sizes.setdefault(run["model"], set()).add(size)
    lines = [*preamble, ""]
    header = ["model", "runs", "conditions x seeds"] + (["video"] if sizes else [])
    header += [title for _, title in columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row["model"], str(row["runs"]), ", ".join(sorted(shapes[row["model"]]))]
        cells += [", ".join(sorted(sizes[row["model"]]))] if sizes else []
        cells += [_cell(row["metrics"][key]) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_grid(sample_file: SampleFile, path: Path, coverage_radius: float) -> None:
    """Images: the first conditions (rows) by the first seeds (columns); points: a scatter of the
    samples (coloured by condition) over the mixture's modes and their coverage radius (in
    mixture stds)."""
    _save(comparison_figure([sample_file], coverage_radius), path)


def save_comparison(sample_files: list[SampleFile], path: Path, coverage_radius: float) -> None:
    """Every model's grid (images) or scatter (points) side by side, COMPARISON_COLUMNS to a
    row, e.g. the teacher at 40 steps next to each student."""
    _save(comparison_figure(sample_files, coverage_radius), path)


def video_strip(
    model: str, videos: Tensor, labels: list[str] | None, frames: list[int] | None = None
) -> SampleFile:
    """A mosaic panel of videos [rows, F, C, H, W] in [-1, 1]: one video a row (labelled by
    `labels`), its frames (numbered by `frames`, default 0..F-1) left to right."""
    return SampleFile(
        path=Path(model),
        model=model,
        samples=videos,
        labels=labels,
        mixture=None,
        column_label="frame",
        column_names=[str(i) for i in (frames or range(videos.shape[1]))],
    )


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


TILE_INCHES = 0.5  # one image of a mosaic, at least (digits: 8 x 8 pixels)
MAX_TILE_INCHES = 2.0  # and at most: a video frame is drawn at 100 pixels an inch up to this
SCATTER_INCHES = 3.4
MIN_PANEL_INCHES = 2.4  # a mosaic narrower than this is centred in a panel this wide
# Room around a panel's axes, in inches: the axis label and tick labels (left: plus the longest
# condition label), the title (top: per line).
LEFT, RIGHT, BOTTOM, TITLE_PAD, TITLE_LINE = 0.45, 0.15, 0.5, 0.15, 0.2
TITLE_POINTS, TICK_POINTS = 9, 7
LABEL_CHARACTERS = 24  # condition labels (prompts, say) are cut to this many characters


def comparison_figure(sample_files: list[SampleFile], coverage_radius: float):
    """The figure `save_comparison` (and, for one file, `save_grid`) writes: one panel per file.

    Panels are placed in inches, not by a layout engine (tight_layout let the fixed-aspect
    mosaics push titles and labels off the figure): each axes gets its mosaic's size, tick and
    axis labels get fixed margins, and titles are wrapped to the panel's width with a top
    margin for as many lines as the longest needs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(COMPARISON_COLUMNS, len(sample_files))
    rows = -(-len(sample_files) // columns)
    if sample_files[0].kind == "images":
        mosaic_rows, mosaic_cols = _mosaic_size(sample_files[0])
        tile_width, tile_height = _tile_inches(sample_files[0])
        width, height = tile_width * mosaic_cols, tile_height * mosaic_rows
    else:
        width = height = SCATTER_INCHES
    width = max(width, MIN_PANEL_INCHES)
    labels = [label for f in sample_files if f.kind == "images" for label in _row_labels(f)]
    left = LEFT + max((_text_inches(label, TICK_POINTS) for label in labels), default=0.0)
    panel_width = left + width + RIGHT
    # a title is centred on its axes: it may reach RIGHT beyond them on either side
    titles = [_wrap(_title(f, coverage_radius), width + 2 * RIGHT - 0.05) for f in sample_files]
    top = TITLE_PAD + TITLE_LINE * max(t.count("\n") + 1 for t in titles)
    panel_height = BOTTOM + height + top
    fig = plt.figure(figsize=(columns * panel_width, rows * panel_height))
    fig_width, fig_height = columns * panel_width, rows * panel_height
    for i, (sample_file, title) in enumerate(zip(sample_files, titles)):
        row, col = divmod(i, columns)
        x0 = col * panel_width + left
        y0 = (rows - 1 - row) * panel_height + BOTTOM
        ax = fig.add_axes([x0 / fig_width, y0 / fig_height, width / fig_width, height / fig_height])
        if sample_file.kind == "images":
            _draw_mosaic(ax, sample_file)
        else:
            _draw_scatter(plt, ax, sample_file, coverage_radius)
        ax.set_title(title, fontsize=TITLE_POINTS)
    return fig


def _text_inches(text: str, points: float) -> float:
    """Width of `text` set in matplotlib's default font at `points` size."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    width, _, _ = RendererAgg(1, 1, 72).get_text_width_height_descent(
        text, FontProperties(size=points), ismath=False
    )
    return width / 72


def _wrap(title: str, inches: float) -> str:
    """`title` broken between words into lines at most `inches` wide (a longer word stays)."""
    lines = []
    for paragraph in title.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _text_inches(candidate, TITLE_POINTS) > inches:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return "\n".join(lines)


def _title(sample_file: SampleFile, coverage_radius: float) -> str:
    if sample_file.kind == "images":
        return sample_file.model
    return (
        f"{sample_file.model}: {sample_file.conditions * sample_file.seeds} samples\n"
        f"circles: {coverage_radius:g} std around each mode"
    )


def _row_labels(sample_file: SampleFile) -> list[str]:
    rows = min(GRID_CONDITIONS, sample_file.conditions)
    labels = sample_file.labels[:rows] if sample_file.labels is not None else range(rows)
    return [str(label)[:LABEL_CHARACTERS] for label in labels]


def _mosaic_size(sample_file: SampleFile) -> tuple[int, int]:
    return (
        min(GRID_CONDITIONS, sample_file.conditions),
        min(GRID_SEEDS, sample_file.seeds),
    )


def _tile_inches(sample_file: SampleFile) -> tuple[float, float]:
    """(width, height) of one image of the mosaic: 100 pixels an inch, between TILE_INCHES and
    MAX_TILE_INCHES wide, the image's aspect ratio kept."""
    height, width = sample_file.samples.shape[-2:]
    tile_width = min(max(TILE_INCHES, width / 100), MAX_TILE_INCHES)
    return tile_width, tile_width * height / width


def _draw_mosaic(ax, sample_file: SampleFile) -> None:
    """One mosaic (a single imshow: fast), images separated by white gaps (1 pixel of an 8 x 8
    digit, 1/16 of a larger image's side, so they survive the downscaling of video frames),
    without a frame (its line would read as one more image edge)."""
    images = (sample_file.samples[:GRID_CONDITIONS, :GRID_SEEDS] + 1) / 2
    rows, cols, channels, height, width = images.shape
    gap = max(1, min(height, width) // 16)
    padded = torch.nn.functional.pad(images, (0, gap, 0, gap), value=1.0)  # [R, S, C, H+g, W+g]
    mosaic = padded.permute(0, 3, 1, 4, 2).reshape(rows * (height + gap), cols * (width + gap), -1)
    mosaic = mosaic[:-gap, :-gap]  # gaps between images only
    mosaic = mosaic[:, :, 0] if channels == 1 else mosaic[:, :, :3]
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    names = sample_file.column_names or range(cols)
    ax.set_xticks([col * (width + gap) + (width - 1) / 2 for col in range(cols)], names[:cols])
    ax.set_yticks(
        [row * (height + gap) + (height - 1) / 2 for row in range(rows)], _row_labels(sample_file)
    )
    ax.tick_params(length=0, labelsize=TICK_POINTS)
    ax.spines[:].set_visible(False)
    ax.set_xlabel(sample_file.column_label, fontsize=8)
    ax.set_ylabel("condition", fontsize=8)


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
