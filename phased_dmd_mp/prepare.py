"""python -m phased_dmd_mp.prepare: a teacher directory from a diffusers pipeline folder and a
prompt file.

    python -m phased_dmd_mp.prepare --pipeline Wan2.2-T2V-A14B-Diffusers --prompts prompts.txt \\
        --out runs/teacher --height 480 --width 832 --frames 81

Reads a Wan2.1/2.2 text-to-video (`WanPipeline`), image-to-video (`WanImageToVideoPipeline`) or
Qwen-Image (`QwenImagePipeline`) folder, checks from the configs alone that its parts and the
requested size agree, then encodes every prompt with the pipeline's own `encode_prompt` (Wan:
umT5, 512 tokens, padding zeroed; Qwen-Image: Qwen2.5-VL with the template prefix dropped, padded
to the longest prompt of the file with `text_mask`) and, for image-to-video, each first frame
with the pipeline's own `prepare_latents` (VAE) and `encode_image` (Wan2.1's CLIP). The negative
prompt (default: empty, as the Wan pipelines use when given none) is the unconditional entry
(QwenImagePipeline applies its true_cfg_scale only when given a negative prompt; teacher.yaml's
guidance is that scale, with the empty prompt as the negative one unless told otherwise).

The teacher directory (data/teacher.py) refers to the pipeline instead of copying it:

    teacher.yaml   latent shape, shift, steps and guidance derived from the pipeline, plus
                   pipeline / transformer / transformer_2 / boundary_ratio paths and values
    conditions/    the condition set (data/conditions.py)

Encoding runs on the GPU in bf16 when there is one (CPU: float32), one batch per shard, each
shard renamed into `conditions.partial/` when complete: a rerun with the same arguments skips the
done shards, so a crash at prompt 90,000 of 100,000 resumes there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from phased_dmd_mp import atomic
from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data import conditions as cs
from phased_dmd_mp.data import readers
from phased_dmd_mp.data.encoders import ConditionEncoder
from phased_dmd_mp.data.pipeline_folder import (
    PipelineFolder,
    check,
    default_size,
    read_pipeline,
    teacher_spec,
)
from phased_dmd_mp.data.teacher import CONDITIONS_DIR, SPEC_FILE, write_spec

PARTIAL = "conditions.partial"
RUN_FILE = "prepare.json"  # in PARTIAL: the arguments the shards were made with


# --- inputs ----------------------------------------------------------------------------------


def takes_images(pipe: PipelineFolder) -> bool:
    """Whether the pipeline conditions on a first frame (--images, IMAGE<TAB>prompt lines)."""
    return pipe.kind == "wan_i2v"


def first_frames(
    pipe: PipelineFolder, images: Path | None, prompts: list[readers.Prompt], prompt_file: Path
) -> list[Path] | None:
    """The first-frame file of each prompt (image-to-video), by name or by sorted order."""
    if not takes_images(pipe):
        if images is not None:
            raise ConfigError(f"--images is for image-to-video pipelines, not {pipe.cls}")
        return None
    if images is None or not images.is_dir():
        raise ConfigError(f"{pipe.cls} needs --images DIR (the first frames), got {images}")
    return readers.match_images(prompts, images, prompt_file)


def _check_finite(items: dict, lines: list[readers.Prompt], prompt_file: Path) -> None:
    """Refuse a batch whose encodings hold NaN/Inf, naming the prompt's file:line."""
    bad = readers.nonfinite_items(items)
    if bad:
        row = min(bad)
        raise ConfigError(
            f"{prompt_file}:{lines[row].line}: the encoders gave NaN/Inf ({', '.join(bad[row])}) "
            f"for {lines[row].text!r}; nothing of this batch was kept"
        )


# --- the run ---------------------------------------------------------------------------------


def _fingerprint(args, prompts_sha: str, images) -> dict:
    return {
        "pipeline": str(Path(args.pipeline).resolve()),
        "prompts_sha256": prompts_sha,
        "images": [str(p) for p in images] if images else None,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "frames": args.frames,
        "batch_size": args.batch_size,
    }


def _done_shards(partial: Path, batches: int) -> int:
    """How many leading shards are complete (written atomically, so present = complete)."""
    done = 0
    while done < batches and (partial / cs.shard_name(done)).is_file():
        done += 1
    return done


def prepare(args) -> Path:
    out: Path = args.out
    pipe = read_pipeline(args.pipeline)
    height, width, frames = default_size(pipe)
    height, width = args.height or height, args.width or width
    frames = args.frames or frames
    args.height, args.width, args.frames = height, width, frames
    latent_shape = check(pipe, height, width, frames)
    spec = teacher_spec(pipe, latent_shape)
    # every input read and checked before the pipeline loads (data/readers.py)
    lines = readers.read_prompt_file(args.prompts, images=takes_images(pipe))
    prompts = [prompt.text for prompt in lines]
    images = first_frames(pipe, args.images, lines, args.prompts)
    if images is not None:
        readers.check_images(images, progress=not args.no_progress)
    negative = "" if args.negative_prompt is None else args.negative_prompt
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (out / CONDITIONS_DIR).exists():
        raise ConfigError(
            f"{out / CONDITIONS_DIR} already exists: {out} is prepared already (choose another "
            "--out, or remove it to prepare again)"
        )

    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    run = _fingerprint(args, hashlib.sha256(args.prompts.read_bytes()).hexdigest(), images)
    run_file = partial / RUN_FILE
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        for key, value in run.items():
            if before.get(key) != value:
                raise ConfigError(
                    f"{partial} was started with {key} {before.get(key)!r}, this run has "
                    f"{value!r}: rerun with the same arguments or delete {partial}"
                )
    else:
        atomic.write_json(run_file, run)

    batches = math.ceil(len(prompts) / args.batch_size)
    done = _done_shards(partial, batches)
    encoder = ConditionEncoder(pipe, height, width, frames, [*prompts, negative])
    with tqdm(
        total=len(prompts),
        initial=min(len(prompts), done * args.batch_size),
        unit="prompt",
        desc="encoding",
        disable=args.no_progress,
    ) as bar:
        for index in range(done, batches):
            start = index * args.batch_size
            chunk = slice(start, start + args.batch_size)
            items = encoder.text(prompts[chunk])
            if images is not None:
                items.update(encoder.image(images[chunk]))
            _check_finite(items, lines[chunk], args.prompts)
            atomic.save_safetensors(items, partial / cs.shard_name(index))
            bar.update(len(prompts[chunk]))
    uncond = {k: v[0] for k, v in encoder.text([negative]).items()}
    if bad := readers.nonfinite_items({k: v[None] for k, v in uncond.items()}):
        raise ConfigError(
            f"the text encoder gave NaN/Inf ({', '.join(bad[0])}) for the negative prompt "
            f"{negative!r}"
        )
    with safe_open(partial / cs.shard_name(0), framework="pt") as handle:
        specs = {name: handle.get_slice(name) for name in handle.keys()}
        specs = {
            name: (tuple(view.get_shape()[1:]), cs.SAFETENSORS_DTYPE_NAMES[view.get_dtype()])
            for name, view in specs.items()
        }
    counts = [min(args.batch_size, len(prompts) - i * args.batch_size) for i in range(batches)]
    cs.publish(partial, specs, counts, uncond, out / CONDITIONS_DIR, finite=True)
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
        required=True,
        type=Path,
        help="text file, one prompt per line (I2V: optionally IMAGE<TAB>prompt)",
    )
    parser.add_argument("--out", required=True, type=Path, help="teacher directory to write")
    parser.add_argument("--negative-prompt", help="the unconditional entry (default: empty)")
    parser.add_argument("--height", type=int, help="pixels (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="pixels (default: the pipeline's)")
    parser.add_argument("--frames", type=int, help="video frames (default: the pipeline's)")
    parser.add_argument("--images", type=Path, help="first frames for image-to-video")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="prompts per batch and per shard (default 16)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = prepare(args)
    except ConfigError as error:
        parser.error(str(error))
    except atomic.DiskFullError as error:  # the finished shards stay: rerun to continue
        print(f"{parser.prog}: error: {error.strerror}", file=sys.stderr)
        return 1
    print(f"teacher directory {out} ({SPEC_FILE}, {CONDITIONS_DIR}/)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
