"""The pictures read well: comparison.png keeps every title and label inside the figure, and
the training previews (samples/iter_*.png) separate their images and label rows and columns."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phased_dmd_mp.distill.previews import save_grid_png
from phased_dmd_mp.eval.mixture import Mixture
from phased_dmd_mp.eval.report import comparison_figure
from phased_dmd_mp.eval.samples import SampleFile

NAMES = ["teacher 40 steps, CFG 1.5", "DMD, 1 step", "DMD+SGTS, 4 steps",
         "Phased DMD, 4 steps, 2 phases", "Phased DMD, 4 steps, 4 phases, nested intervals"]  # fmt: skip


def image_files(models: int, conditions: int, seeds: int, label: str | None = None):
    labels = [label or str(c) for c in range(conditions)]
    samples = torch.rand(conditions, seeds, 1, 8, 8) * 2 - 1
    return [SampleFile(Path("x"), NAMES[i], samples, labels, None) for i in range(models)]


def point_files(models: int):
    mixture = Mixture.from_values([[0.0, 0.0], [2.0, 2.0]], [0.5, 0.5], 0.1)
    samples = torch.randn(1, 200, 2, dtype=torch.float64)
    return [SampleFile(Path("x"), NAMES[i], samples, None, mixture) for i in range(models)]


@pytest.mark.parametrize(
    "files",
    [
        image_files(4, 10, 16),  # the digits reproduction's comparison.png
        image_files(5, 10, 8),
        image_files(1, 3, 2),  # narrow: the title wraps
        image_files(2, 10, 4, label="a cat sitting on a mat, in the style of"),
        point_files(4),
    ],
    ids=["digits", "two_rows", "narrow", "prompt_labels", "points"],
)
def test_titles_and_labels_lie_inside_the_figure(files):
    fig = comparison_figure(files, coverage_radius=2.0)
    fig.draw_without_rendering()
    renderer, figure = fig.canvas.get_renderer(), fig.bbox
    assert len(fig.axes) == len(files)
    for ax, sample_file in zip(fig.axes, files):
        assert ax.get_title().replace("\n", " ").startswith(sample_file.model)
        drawn = ax.get_tightbbox(renderer)  # the axes with its title, ticks and labels
        assert figure.x0 <= drawn.x0 and drawn.x1 <= figure.x1, ax.get_title()
        assert figure.y0 <= drawn.y0 and drawn.y1 <= figure.y1, ax.get_title()


def test_preview_grid_separates_images_and_labels_rows_and_columns(tmp_path):
    conditions, seeds = 3, 4
    path = tmp_path / "iter_000010.png"
    save_grid_png(
        torch.zeros(conditions, seeds, 1, 8, 8), ["zero", "one", "two"], "iteration 10", path
    )
    pixels = np.asarray(Image.open(path).convert("L"))
    dark = pixels < 128
    # The black images, and nothing else that dark, form a block of separated tiles.
    columns = np.flatnonzero(dark.sum(0) > dark.shape[0] // 4)
    rows = np.flatnonzero(dark.sum(1) > dark.shape[1] // 4)
    mosaic = dark[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]

    def runs(line):  # number of dark runs along a line
        return int(line[0]) + int(np.count_nonzero(line[1:] & ~line[:-1]))

    middle_row = mosaic[mosaic.shape[0] // (2 * conditions)]
    middle_column = mosaic[:, mosaic.shape[1] // (2 * seeds)]
    assert runs(middle_row) == seeds and runs(middle_column) == conditions
    gap = np.flatnonzero(~middle_row)
    assert gap.size >= 3 * (seeds - 1)  # white gaps of a few pixels, not touching tiles
    # Labels: ink left of the mosaic (condition labels) and below it (seed numbers, "seed").
    assert dark[:, : columns.min() - 2].any() and dark[rows.max() + 2 :, :].any()
    assert dark[: rows.min() - 2, :].any()  # the title above


def test_video_frames_preview_is_a_labelled_colour_mosaic_at_their_aspect(tmp_path):
    """Pixel previews of pipeline teachers (samples/iter_N.png, sample's grid.png): colour
    frames, wider than tall, drawn with gaps and labels like the digits grid."""
    conditions, seeds, height, width = 2, 3, 48, 80
    frames = torch.zeros(conditions, seeds, 3, height, width)
    frames[:, :, 0] = 1.0  # red frames
    path = tmp_path / "iter_000002.png"
    save_grid_png(frames, None, "iteration 2", path)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    columns = np.flatnonzero(red.any(0))
    rows = np.flatnonzero(red.any(1))
    block = red[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]

    def runs(line):
        return int(line[0]) + int(np.count_nonzero(line[1:] & ~line[:-1]))

    assert runs(block[block.shape[0] // (2 * conditions)]) == seeds
    assert runs(block[:, block.shape[1] // (2 * seeds)]) == conditions
    aspect = (block.shape[1] / seeds) / (block.shape[0] / conditions)
    assert abs(aspect - width / height) < 0.15 * width / height  # frames keep their shape
    dark = pixels.sum(-1) < 200
    assert dark[:, : columns.min() - 2].any() and dark[rows.max() + 2 :, :].any()  # labels
