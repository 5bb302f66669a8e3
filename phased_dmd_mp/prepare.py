"""python -m phased_dmd_mp.prepare: a teacher directory from a diffusers pipeline folder and a
prompt file.

    python -m phased_dmd_mp.prepare --pipeline Wan2.2-T2V-A14B-Diffusers --prompts prompts.txt \\
        --out runs/teacher --height 480 --width 832 --frames 81

Reads a Wan2.1/2.2 text-to-video (`WanPipeline`), image-to-video (`WanImageToVideoPipeline`) or
Qwen-Image (`QwenImagePipeline`) folder (data/pipeline_folder.py), checks from the configs alone
that its parts and the requested size agree, then encodes every prompt with the pipeline's own
`encode_prompt` (data/encoders.py; Wan: umT5; Qwen-Image: Qwen2.5-VL with the template prefix
dropped) and, for image-to-video, each first frame with the pipeline's own `prepare_latents` (VAE)
and `encode_image` (Wan2.1's CLIP). A Wan2.2 TI2V folder (`expand_timesteps`) prepares
text-to-video without --images, image-to-video with them (each first frame's latents, as
WanImageToVideoPipeline with expand_timesteps makes them). Each prompt's real tokens are stored, in the text encoder's
`--dtype` (default bfloat16, the recipes' compute dtype; float32 as before); the reader pads them
as the pipeline does (Wan: zeros to 512 tokens; Qwen-Image: the batch's longest, with the mask).
The negative prompt (default: empty, as the Wan pipelines use when given none) is the
unconditional entry (QwenImagePipeline applies its true_cfg_scale only when given a negative
prompt; teacher.yaml's guidance is that scale, with the empty prompt as the negative one unless
told otherwise).

The teacher directory (data/teacher.py) refers to the pipeline instead of copying it:

    teacher.yaml   latent shape, shift, steps and guidance derived from the pipeline, plus
                   pipeline / transformer / transformer_2 / boundary_ratio paths and values
    conditions/    the condition set (data/conditions.py)
    real_data/     with --videos (Wan) or real --images (Qwen-Image): real samples encoded by the
                   pipeline's VAE, each with its condition item (its caption's, added to the
                   set, or its prompt line's), for the real-data levers (data/real_encoding.py)

Prompts go to shards of `--shard-size` consecutive prompts (named by their range), encoded in
batches of `--batch-size` from the shard's start, each shard written into `conditions.partial/`
under a temporary name and renamed when complete (phased_dmd_mp/atomic.py; a full disk is one
line, exit 1): a rerun with the same arguments skips the done shards, so a crash at prompt
90,000 of 100,000 resumes there. Under torchrun
(`torchrun --nproc_per_node=8 -m phased_dmd_mp.prepare ...`, scripts/slurm/prepare.sbatch) rank r
encodes shards r, r + N, ... on its own GPU (LOCAL_RANK); rank 0 shows the whole job's progress
and, when every shard is there, writes the manifest: the set is the same for any N, and a rerun
with another N continues it. Encoders run on the GPU when there is one, else on the CPU.

`--online` writes the prompt list instead (data/online.py): the runner encodes each batch when it
draws it, on `--online-device` (each rank's GPU, or the CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data import conditions as cs
from phased_dmd_mp.data import readers, real_encoding
from phased_dmd_mp.data.condition_writer import publish, real_text_tensors
from phased_dmd_mp.data.encoders import ENCODER_DTYPES, ConditionEncoder, encoder_device
from phased_dmd_mp.data.online import write_online_set
from phased_dmd_mp.data.real_data import REAL_DATA_DIR
from phased_dmd_mp.data.pipeline_folder import (
    QWEN_MAX_TOKENS,
    WAN_TEXT_TOKENS,
    PipelineFolder,
    check,
    default_size,
    read_pipeline,
    teacher_spec,
    text_width,
)
from phased_dmd_mp.data.teacher import CONDITIONS_DIR, SPEC_FILE, write_spec

PARTIAL = "conditions.partial"
RUN_FILE = "prepare.json"  # in PARTIAL: the arguments the shards were made with


def takes_images(pipe: PipelineFolder) -> bool:
    """Whether the pipeline conditions on a first frame (--images, IMAGE<TAB>prompt lines):
    image-to-video always, Wan2.2 TI2V when given images (text-to-video without)."""
    return pipe.takes_first_frames


def first_frames(
    pipe: PipelineFolder, images: Path | None, prompts: list[readers.Prompt], prompt_file: Path
) -> list[Path] | None:
    """The first-frame file of each prompt (image-to-video), by name or by sorted order."""
    if not takes_images(pipe):
        if images is not None:
            raise ConfigError(f"--images is for image-to-video pipelines, not {pipe.cls}")
        return None
    if images is None and pipe.kind == "wan_ti2v":
        return None  # text-to-video
    if images is None or not images.is_dir():
        raise ConfigError(f"{pipe.cls} needs --images DIR (the first frames), got {images}")
    return readers.match_images(prompts, images, prompt_file)


def _check_finite(texts, fields: dict, lines: list[readers.Prompt], prompt_file: Path) -> None:
    """Refuse a batch whose encodings (real-token texts, image fields [n, ...]) hold NaN/Inf,
    naming the prompt's file:line."""
    bad = readers.nonfinite_items(fields)
    for row, text in enumerate(texts):
        if not torch.isfinite(text).all():
            bad.setdefault(row, []).insert(0, "text")
    if bad:
        row = min(bad)
        raise ConfigError(
            f"{prompt_file}:{lines[row].line}: the encoders gave NaN/Inf ({', '.join(bad[row])}) "
            f"for {lines[row].text!r}; nothing of this shard was kept"
        )


# --- the run ---------------------------------------------------------------------------------


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in one process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _with_real_data(pipe, args, real, lines):
    """(every prompt, each one's first frame or None, each real sample's condition item or None)
    with the real samples' captions added as items (data/real_encoding.py); an image-to-video
    item whose clip is its real sample starts from the clip's own first frame."""
    if real is None:
        return lines, first_frames(pipe, args.images, lines, args.prompts), None
    added, items = real_encoding.condition_items(real, lines, args.prompts)
    if not takes_images(pipe):
        return lines + added, None, items
    if real.captions is None:  # the prompt file's lines are the clips'
        if args.images is not None:
            raise ConfigError(
                "--images: the first frames are the --videos clips' own, as the prompt file's "
                "lines go with the clips (caption the clips to add them to other prompts)"
            )
        return lines, list(real.files), items
    images = first_frames(pipe, args.images, lines, args.prompts) if lines else []
    return lines + added, images + list(real.files), items


def _fingerprint(args, prompts_sha: str, images) -> dict:
    """What the shards depend on (not the number of processes)."""
    return {
        "pipeline": str(Path(args.pipeline).resolve()),
        "prompts_sha256": prompts_sha,
        "images": [str(p) for p in images] if images else None,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "frames": args.frames,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "videos": None if args.videos is None else str(args.videos.resolve()),
        "fps": args.fps,
    }


def _check_run_file(partial: Path, run: dict, rank: int) -> None:
    """Refuse to continue shards made with other arguments (every rank reads an existing
    record); rank 0 records them otherwise."""
    run_file = partial / RUN_FILE
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        for key, value in run.items():
            if before.get(key) != value:
                raise ConfigError(
                    f"{partial} was started with {key} {before.get(key)!r}, this run has "
                    f"{value!r}: rerun with the same arguments or delete {partial}"
                )
    elif rank == 0:
        atomic.write_json(run_file, run)


class JobProgress:
    """The whole job's prompts on one bar: every finished shard in `partial` (whichever rank
    wrote it, the directory listed at most once a second) plus this rank's current shard."""

    def __init__(self, partial: Path, ranges: list[tuple[int, int]], enabled: bool):
        self.partial, self.enabled = partial, enabled
        self.counts = {cs.shard_name(start, stop): stop - start for start, stop in ranges}
        self.total = sum(self.counts.values())
        self.current = 0
        self.listed_at, self.listed = -math.inf, 0
        self.bar = tqdm(total=self.total, unit="prompt", desc="encoding", disable=not enabled)
        self.refresh()

    def finished(self) -> int:
        """Prompts in the shards written so far (all ranks)."""
        if time.monotonic() - self.listed_at >= 1.0:
            self.listed = sum(self.counts.get(name, 0) for name in os.listdir(self.partial))
            self.listed_at = time.monotonic()
        return self.listed

    def refresh(self) -> None:
        if self.enabled:
            self.bar.update(self.finished() + self.current - self.bar.n)

    def advance(self, prompts: int) -> None:
        self.current += prompts
        self.refresh()

    def shard_saved(self) -> None:
        self.current = 0
        self.listed_at = -math.inf  # count the shard just written
        self.refresh()

    def wait_for_all(self, poll_s: float = 1.0) -> None:
        """Until every shard is there (the other ranks' too). A rank that fails ends the job:
        torchrun stops the others."""
        while self.finished() < self.total:
            self.refresh()
            time.sleep(poll_s)
        self.refresh()
        self.bar.close()


def _text_specs(pipe, partial: Path, names: list[str], uncond: torch.Tensor, dtype: str) -> dict:
    """The text's per-item specs: Wan pads to 512 tokens; Qwen-Image's are the longest prompt
    (read from the shards' offsets), with the mask."""
    width = text_width(pipe)
    if pipe.is_wan:
        return {"text": ((WAN_TEXT_TOKENS, width), dtype)}
    longest = len(uncond)
    for name in names:
        with safe_open(partial / name, framework="pt") as handle:
            offsets = handle.get_tensor(cs.TEXT_OFFSETS)
        longest = max(longest, int(offsets.diff().max()))
    return {"text": ((longest, width), dtype), "text_mask": ((longest,), "int64")}


def _encode_shard(encoder, lines, images, start, stop, args, progress) -> dict:
    """The shard of prompts [start, stop), encoded in batches of --batch-size from `start`.
    Raises ConfigError naming the prompt's line if an encoding is not finite."""
    texts, fields, cut = [], {}, []
    kept = WAN_TEXT_TOKENS if encoder.pipe_info.is_wan else QWEN_MAX_TOKENS
    for first in range(start, stop, args.batch_size):
        chunk = slice(first, min(first + args.batch_size, stop))
        batch_texts = encoder.text([line.text for line in lines[chunk]])
        batch_fields = encoder.image(images[chunk]) if images is not None else {}
        _check_finite(batch_texts, batch_fields, lines[chunk], args.prompts)
        cut += [line.line for line, text in zip(lines[chunk], batch_texts) if len(text) >= kept]
        texts += batch_texts
        for name, tensor in batch_fields.items():
            fields.setdefault(name, []).append(tensor)
        progress.advance(chunk.stop - chunk.start)
    if cut:  # the pipeline's encode_prompt truncates silently: the cut-off words never count
        tqdm.write(
            f"warning: {len(cut)} prompt(s) of {args.prompts or 'the captions'} fill all {kept} tokens the text "
            f"encoder keeps and are cut there (line {', '.join(map(str, cut[:5]))}"
            f"{', ...' if len(cut) > 5 else ''}): shorten them to keep all their words",
            file=sys.stderr,
        )
    return {**real_text_tensors(texts), **{k: torch.cat(v) for k, v in fields.items()}}


def prepare(args) -> Path | None:
    """Write the teacher directory `args.out` (module docstring); returns it on rank 0, None on
    the other ranks. Raises ConfigError for a user mistake."""
    rank, world, local_rank = _world()
    out: Path = args.out
    pipe = read_pipeline(args.pipeline)
    height, width, frames = default_size(pipe)
    height, width = args.height or height, args.width or width
    frames = args.frames or frames
    args.height, args.width, args.frames = height, width, frames
    latent_shape = check(pipe, height, width, frames)
    spec = teacher_spec(pipe, latent_shape)
    # every input read and checked before the pipeline loads (data/readers.py)
    real = real_encoding.real_inputs(pipe, args.videos, args.images, frames)
    if args.prompts is None and (real is None or real.captions is None):
        raise ConfigError("--prompts is required (or real --videos/--images with caption files)")
    lines = []
    if args.prompts is not None:
        lines = readers.read_prompt_file(args.prompts, images=takes_images(pipe))
    lines, images, real_items = _with_real_data(pipe, args, real, lines)
    prompts = [prompt.text for prompt in lines]
    if images is not None and rank == 0:  # the same files for every rank: one reads them
        stills = [p for p in images if p.suffix.lower() not in real_encoding.VIDEO_SUFFIXES]
        readers.check_images(stills, progress=not args.no_progress)
    if real is not None and real.kind == "video" and rank == 0:
        real_encoding.check_videos(real.files, frames, args.fps, progress=not args.no_progress)
    negative = "" if args.negative_prompt is None else args.negative_prompt
    for flag, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if (out / CONDITIONS_DIR).exists():
        raise ConfigError(
            f"{out / CONDITIONS_DIR} already exists: {out} is prepared already (choose another "
            "--out, or remove it to prepare again)"
        )
    if args.online:
        if real is not None:
            raise ConfigError(
                "--online stores the prompt list only: prepare the real --videos/--images "
                "(real_data/) without --online"
            )
        if rank == 0:
            write_online_set(
                out / CONDITIONS_DIR, pipe, prompts, negative, args.dtype, args.online_device
            )
            write_spec(out, spec)
        return out if rank == 0 else None

    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(b"" if args.prompts is None else args.prompts.read_bytes())
    digest.update("\n".join(prompts).encode())  # captions too
    _check_run_file(partial, _fingerprint(args, digest.hexdigest(), images), rank)
    ranges = [
        (start, min(start + args.shard_size, len(prompts)))
        for start in range(0, len(prompts), args.shard_size)
    ]
    done = set(os.listdir(partial))
    mine = [
        (start, stop)
        for index, (start, stop) in enumerate(ranges)
        if index % world == rank and cs.shard_name(start, stop) not in done
    ]
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    encoder = None
    if mine or rank == 0:
        size = (height, width, frames) if images is not None else None
        encoder = ConditionEncoder(pipe, ENCODER_DTYPES[args.dtype], encoder_device("gpu"), size)
    progress = JobProgress(partial, ranges, enabled=rank == 0 and not args.no_progress)
    for start, stop in mine:
        tensors = _encode_shard(encoder, lines, images, start, stop, args, progress)
        atomic.save_safetensors(tensors, partial / cs.shard_name(start, stop))
        progress.shard_saved()
    if rank != 0:
        return None
    progress.wait_for_all()

    (uncond,) = encoder.text([negative])
    del encoder  # its text encoder; the real data needs only the VAE
    if not torch.isfinite(uncond).all():
        raise ConfigError(
            f"the text encoder gave NaN/Inf (text) for the negative prompt {negative!r}"
        )
    files = [cs.shard_name(start, stop) for start, stop in ranges]
    specs = _text_specs(pipe, partial, files, uncond, args.dtype)
    if images is not None:
        with safe_open(partial / files[0], framework="pt") as handle:
            for name in ("image_latents", "image_embeds", "first_frame_latents"):
                if name in handle.keys():
                    view = handle.get_slice(name)
                    dtype = cs.SAFETENSORS_DTYPE_NAMES[view.get_dtype()]
                    specs[name] = (tuple(view.get_shape()[1:]), dtype)
    shards = [(name, stop - start) for name, (start, stop) in zip(files, ranges)]
    for leftover in partial.glob(".*.partial*"):  # a shard being written when a run was killed
        leftover.unlink()
    if real is not None:  # before the conditions are published: a rerun resumes it
        size = (height, width, frames)
        progress = not args.no_progress
        real_encoding.encode_real_data(
            out, pipe, real, real_items, size, args.fps, args.batch_size, progress
        )
    uncond_tensors = real_text_tensors([uncond])
    publish(partial, specs, shards, uncond_tensors, out / CONDITIONS_DIR, "real", finite=True)
    write_spec(out, spec)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--pipeline", required=True, type=Path, help="diffusers pipeline folder (model_index.json)"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        help="text file, one prompt per line (I2V: optionally IMAGE<TAB>prompt); optional "
        "when every --videos/--images file has its caption file",
    )
    parser.add_argument("--out", required=True, type=Path, help="teacher directory to write")
    parser.add_argument("--negative-prompt", help="the unconditional entry (default: empty)")
    parser.add_argument("--height", type=int, help="pixels (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="pixels (default: the pipeline's)")
    parser.add_argument("--frames", type=int, help="video frames (default: the pipeline's)")
    parser.add_argument(
        "--images",
        type=Path,
        help="first frames for image-to-video; for Qwen-Image (or Wan at --frames 1) real "
        "images, encoded into real_data/",
    )
    parser.add_argument(
        "--videos",
        type=Path,
        help="real clips (Wan), encoded into real_data/ for the real-data levers; each with its "
        "caption beside it (clip.txt) or the prompt file's lines in sorted order",
    )
    parser.add_argument(
        "--fps", type=float, default=16.0, help="frame rate clips are resampled to (default 16)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="prompts per encoder call (default 16)"
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=1024,
        help="prompts per shard file, the unit a rerun resumes from (default 1024)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(ENCODER_DTYPES),
        default="bfloat16",
        help="the text encoder's dtype, the stored embeddings' (default bfloat16)",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="store the prompt list only: the runner encodes each batch when it draws it",
    )
    parser.add_argument(
        "--online-device",
        choices=["gpu", "cpu"],
        default="gpu",
        help="where an online set's text encoder runs: each rank's GPU (default) or the CPU",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = prepare(args)
    except ConfigError as error:
        if _world()[0] != 0:  # every rank meets the same mistake: rank 0 says it
            return 2
        parser.error(str(error))
    except atomic.DiskFullError as error:  # the finished shards stay: rerun to continue
        print(f"{parser.prog}: error: {error.strerror}", file=sys.stderr)
        return 1
    if out is not None:
        real = f", {REAL_DATA_DIR}/" if (out / REAL_DATA_DIR).is_dir() else ""
        print(f"teacher directory {out} ({SPEC_FILE}, {CONDITIONS_DIR}/{real})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
