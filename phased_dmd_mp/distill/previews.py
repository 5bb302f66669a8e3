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
shows while it trains, next to the diversity proxy `samples/pairwise_distance`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from phased_dmd_mp import atomic


def log_samples(d) -> None:
    """A fixed-seed grid (conditions x seeds) and a cheap diversity proxy: the mean pairwise
    distance between the seeds of a condition, so mode collapse shows while training."""
    conditions, seeds = min(10, len(d.conditions)), 4
    cond = d.conditions.batch(torch.arange(conditions).repeat_interleave(seeds)).to(d.device)
    noise = torch.randn(
        (conditions * seeds, *d.latent_shape),
        generator=torch.Generator().manual_seed(d.config.seed),
    ).to(d.device)
    images = d.sample(noise, cond).float().cpu().unflatten(0, (conditions, seeds))
    flat = images.flatten(2)
    diversity = torch.cdist(flat, flat).sum() / (conditions * seeds * (seeds - 1))
    measured = {"pairwise_distance": float(diversity)}
    # the logging rank writes; a full disk there fails every rank (none waits in a collective)
    atomic.collective_write(
        lambda: d.is_logger and _write(d, images, diversity, conditions, measured)
    )
    record_measurement(d.state.history, d.state.iteration, **measured)


def _write(d, images: Tensor, diversity: Tensor, conditions: int, measured: dict) -> None:
    """TensorBoard scalars and grid, and the preview files (logging rank); videos add their
    optical flow to `measured`."""
    d.writer.add_scalar("samples/pairwise_distance", float(diversity), d.state.iteration)
    if d.latent_shape[:2] == (1, 1):  # one-channel single frames: show them
        low, high = d.value_range
        grid = ((images[:, :, :, 0] - low) / (high - low)).clamp(0, 1)  # [cond, seed, 1, H, W]
        rows = [torch.cat(list(row), dim=-1) for row in grid]  # each [1, H, seeds * W]
        d.writer.add_image("samples/grid", torch.cat(rows, dim=-2), d.state.iteration)
        labels = d.conditions.labels
        save_grid_png(
            grid,
            None if labels is None else [str(label) for label in labels[:conditions].tolist()],
            f"iteration {d.state.iteration}",
            d.run_dir / "samples" / f"iter_{d.state.iteration:06d}.png",
        )
    elif d.pipeline_dir is not None:
        flow = write_pixel_previews(d, images)
        if flow is not None:
            measured["optical_flow"] = flow
    elif d.latent_shape[1] > 1 and d.latent_shape[0] in (1, 3):  # videos in pixels
        measured["optical_flow"] = write_video_previews(d, images)
    if "optical_flow" in measured:
        d.writer.add_scalar("samples/optical_flow", measured["optical_flow"], d.state.iteration)


def write_video_previews(d, latents: Tensor) -> float:
    """Pixel-space videos [conditions, seeds, C, F, H, W]: seed 0's frames per condition as
    samples/iter_N.png and TensorBoard's samples/frames; returns their mean optical flow over
    every condition and seed."""
    from phased_dmd_mp.eval.motion import optical_flow

    low, high = d.value_range
    videos = (2 * (latents.float() - low) / (high - low) - 1).clamp(-1, 1).transpose(2, 3)
    strip = (videos[:, 0] + 1) / 2  # [conditions, F, C, H, W] in [0, 1]
    rows = [torch.cat(list(row), dim=-1) for row in strip]  # frames side by side
    d.writer.add_image("samples/frames", torch.cat(rows, dim=-2), d.state.iteration)
    labels = d.conditions.labels
    save_grid_png(
        strip,
        None if labels is None else [str(label) for label in labels[: len(strip)].tolist()],
        f"iteration {d.state.iteration} (seed 0)",
        d.run_dir / "samples" / f"iter_{d.state.iteration:06d}.png",
        column_label="frame",
    )
    return optical_flow(videos.flatten(0, 1))


VIDEO_CONDITIONS = 4


def write_pixel_previews(d, latents: Tensor) -> float | None:
    """PNG grid of first frames and (video) an MP4 of `latents` [conditions, seeds, C, F, H, W],
    decoded `d.micro` at a time with the VAE of the teacher's pipeline (loaded once); returns
    the mean optical flow of the decoded videos (None for images)."""
    from phased_dmd_mp import media
    from phased_dmd_mp.eval.motion import optical_flow

    if getattr(d, "preview_vae", None) is None:
        d.preview_vae = media.load_vae(d.pipeline_dir, d.device)
    conditions, seeds = latents.shape[:2]
    name = d.run_dir / "samples" / f"iter_{d.state.iteration:06d}"
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
