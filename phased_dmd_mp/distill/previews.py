"""Sample previews while training: a fixed-seed grid and a diversity proxy (run mechanics,
kept apart from the distillation step).

Teachers prepared from a diffusers pipeline (teacher.yaml `pipeline`) are previewed in pixels,
decoded through that pipeline's VAE on the logging rank (phased_dmd_mp.media):
samples/iter_N.png, the first frames of the grid (conditions x seeds), and for video
samples/iter_N.mp4, the first seed of up to VIDEO_CONDITIONS conditions side by side. Video
teachers without a VAE whose latents are pixels (1 or 3 channels: the moving digits) get
samples/iter_N.png of seed 0's frames per condition, also in TensorBoard (samples/frames).

For video, the motion of the previewed samples is measured too: `samples/optical_flow` in
TensorBoard and the history, the mean optical flow (OpenCV DIS, pixels per frame) of the decoded
videos, or of every fixed-seed sample for pixel latents, so a student losing the teacher's motion
shows while it trains, next to the diversity proxy `samples/pairwise_distance`.

A run of several latent shapes (`latent_shapes`) previews each: file names and TensorBoard tags
end in the shape (samples/iter_N_CxFxHxW.png, samples/pairwise_distance_CxFxHxW), and the
history holds each shape's measurements and their means under the plain names."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from phased_dmd_mp import atomic


def log_samples(d) -> None:
    """A fixed-seed grid (conditions x seeds) and a cheap diversity proxy: the mean pairwise
    distance between the seeds of a condition, so mode collapse shows while training; at each
    trained latent shape (module docstring)."""
    per_shape = {}
    for shape in d.latent_shapes:
        suffix = "" if len(d.latent_shapes) == 1 else "_" + "x".join(map(str, shape))
        per_shape[suffix] = _measure(d, tuple(shape), suffix)
    measured = {f"{key}{suffix}": value for suffix, m in per_shape.items() if suffix
                for key, value in m.items()}  # fmt: skip
    for key in {key for m in per_shape.values() for key in m}:
        values = [m[key] for m in per_shape.values() if key in m]
        measured[key] = sum(values) / len(values)
    record_measurement(d.state.history, d.state.iteration, **measured)


def _measure(d, shape: tuple[int, int, int, int], suffix: str) -> dict:
    conditions, seeds = min(10, len(d.conditions)), 4
    cond = d.conditions.batch(torch.arange(conditions).repeat_interleave(seeds)).to(d.device)
    noise = torch.randn(
        (conditions * seeds, *shape),
        generator=torch.Generator().manual_seed(d.config.seed),
    ).to(d.device)
    images = d.sample(noise, cond).float().cpu().unflatten(0, (conditions, seeds))
    flat = images.flatten(2)
    diversity = torch.cdist(flat, flat).sum() / (conditions * seeds * (seeds - 1))
    measured = {"pairwise_distance": float(diversity)}
    # the logging rank writes; a full disk there fails every rank (none waits in a collective)
    atomic.collective_write(
        lambda: d.is_logger and _write(d, images, shape, suffix, conditions, measured)
    )
    return measured


def _write(d, images: Tensor, shape, suffix: str, conditions: int, measured: dict) -> None:
    """TensorBoard scalars and grid, and the preview files (logging rank); videos add their
    optical flow to `measured`."""
    name = d.run_dir / "samples" / f"iter_{d.state.iteration:06d}{suffix}"
    d.writer.add_scalar(
        f"samples/pairwise_distance{suffix}", measured["pairwise_distance"], d.state.iteration
    )
    if shape[:2] == (1, 1):  # one-channel single frames: show them
        low, high = d.value_range
        grid = ((images[:, :, :, 0] - low) / (high - low)).clamp(0, 1)  # [cond, seed, 1, H, W]
        rows = [torch.cat(list(row), dim=-1) for row in grid]  # each [1, H, seeds * W]
        d.writer.add_image(f"samples/grid{suffix}", torch.cat(rows, dim=-2), d.state.iteration)
        labels = d.conditions.labels
        save_grid_png(
            grid,
            None if labels is None else [str(label) for label in labels[:conditions].tolist()],
            f"iteration {d.state.iteration}",
            Path(f"{name}.png"),
        )
    elif d.pipeline_dir is not None:
        flow = write_pixel_previews(d, images, name)
        if flow is not None:
            measured["optical_flow"] = flow
    elif shape[1] > 1 and shape[0] in (1, 3):  # videos in pixels
        measured["optical_flow"] = write_video_previews(d, images, name, suffix)
    if "optical_flow" in measured:
        d.writer.add_scalar(
            f"samples/optical_flow{suffix}", measured["optical_flow"], d.state.iteration
        )


def write_video_previews(d, latents: Tensor, name: Path, suffix: str = "") -> float:
    """Pixel-space videos [conditions, seeds, C, F, H, W]: seed 0's frames per condition as
    `name`.png and TensorBoard's samples/frames(suffix); returns their mean optical flow over
    every condition and seed."""
    from phased_dmd_mp.eval.motion import optical_flow

    low, high = d.value_range
    videos = (2 * (latents.float() - low) / (high - low) - 1).clamp(-1, 1).transpose(2, 3)
    strip = (videos[:, 0] + 1) / 2  # [conditions, F, C, H, W] in [0, 1]
    rows = [torch.cat(list(row), dim=-1) for row in strip]  # frames side by side
    d.writer.add_image(f"samples/frames{suffix}", torch.cat(rows, dim=-2), d.state.iteration)
    labels = d.conditions.labels
    save_grid_png(
        strip,
        None if labels is None else [str(label) for label in labels[: len(strip)].tolist()],
        f"iteration {d.state.iteration} (seed 0)",
        Path(f"{name}.png"),
        column_label="frame",
    )
    return optical_flow(videos.flatten(0, 1))


VIDEO_CONDITIONS = 4


def write_pixel_previews(d, latents: Tensor, name: Path) -> float | None:
    """`name`.png, a grid of first frames, and (video) `name`.mp4 of `latents` [conditions,
    seeds, C, F, H, W], decoded `d.micro` at a time with the VAE of the teacher's pipeline
    (loaded once); returns the mean optical flow of the decoded videos (None for images)."""
    from phased_dmd_mp import media
    from phased_dmd_mp.eval.motion import optical_flow

    if getattr(d, "preview_vae", None) is None:
        d.preview_vae = media.load_vae(d.pipeline_dir, d.device)
    conditions, seeds = latents.shape[:2]
    # Wan's VAE is causal in time: the first latent frame alone decodes to the first frame
    first = media.decode_latents(d.preview_vae, latents[:, :, :, :1].flatten(0, 1), d.micro)
    frames = first[:, 0].unflatten(0, (conditions, seeds)).permute(0, 1, 4, 2, 3)  # [c, s, 3, H, W]
    save_grid_png(frames, None, f"iteration {d.state.iteration}", Path(f"{name}.png"))
    if latents.shape[3] > 1:
        shown = latents[: min(conditions, VIDEO_CONDITIONS), 0]
        videos = media.decode_latents(d.preview_vae, shown, d.micro)  # [n, F, H, W, 3]
        with atomic.replacing(f"{name}.mp4") as temporary:
            media.write_mp4(torch.cat(list(videos), dim=2), temporary)
        return optical_flow(videos.permute(0, 1, 4, 2, 3) * 2 - 1)
    return None


def record_measurement(history: list[dict], iteration: int, **values: float) -> None:
    """Add `values` to the history entry of `iteration`: the one the log just wrote when it
    logged this iteration too, otherwise a new entry (never an earlier iteration's)."""
    if history and history[-1].get("iteration") == iteration:
        history[-1].update(values)
    else:
        history.append({"iteration": iteration, **values})


def save_grid_png(
    grid: Tensor, labels: list[str] | None, title: str, path: Path, column_label: str = "seed"
) -> None:
    """Images [conditions, seeds (or frames), 1 or 3, H, W] in [0, 1] as a PNG: a mosaic with gaps
    between the images, rows labelled by condition (`labels`, else its index) and columns by
    `column_label`, drawn as the evaluation draws its grids (phased_dmd_mp.eval.report)."""
    from phased_dmd_mp.eval.report import save_grid
    from phased_dmd_mp.eval.samples import SampleFile

    with atomic.replacing(path) as temporary:
        sample_file = SampleFile(path, title, grid * 2 - 1, labels, None, column_label=column_label)
        save_grid(sample_file, temporary, coverage_radius=0.0)
