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
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data import conditions as cs
from phased_dmd_mp.data.teacher import CONDITIONS_DIR, SPEC_FILE, TeacherSpec, write_spec

PIPELINES = {
    "WanPipeline": "wan_t2v",
    "WanImageToVideoPipeline": "wan_i2v",
    "QwenImagePipeline": "qwen_image",
}
WAN_TEXT_TOKENS = 512  # Wan's umT5 length (the I2V transformer splits image/text tokens at it)
QWEN_MAX_TOKENS = 1024  # QwenImagePipeline.encode_prompt's max_sequence_length
QWEN_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (latent patches per side)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PARTIAL = "conditions.partial"
RUN_FILE = "prepare.json"  # in PARTIAL: the arguments the shards were made with


@dataclass(frozen=True)
class PipelineFolder:
    """A diffusers pipeline folder described by its configs (no weights read)."""

    path: Path
    kind: str  # wan_t2v | wan_i2v | qwen_image
    cls: str  # the pipeline class name
    index: dict  # model_index.json
    transformer: dict
    transformer_2: dict | None
    vae: dict
    text_encoder: dict
    scheduler: dict
    image_encoder: dict | None

    @property
    def is_wan(self) -> bool:
        return self.kind != "qwen_image"

    def call_default(self, name: str):
        """A default of the pipeline's `__call__` (its own guidance scale, steps, size)."""
        import diffusers

        return inspect.signature(getattr(diffusers, self.cls).__call__).parameters[name].default


def _config(folder: Path, component: str, file: str = "config.json") -> dict:
    path = folder / component / file
    if not path.is_file():
        raise ConfigError(f"{path} is missing (the pipeline's {component} folder)")
    return json.loads(path.read_text())


def read_pipeline(folder: str | Path) -> PipelineFolder:
    """The configs of a pipeline folder. Raises ConfigError for a folder that is not a supported
    diffusers pipeline or lacks a component."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(
            f"{folder} has no model_index.json (expected a diffusers pipeline folder)"
        )
    index = json.loads(index_path.read_text())
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise ConfigError(f"{index_path}: pipeline {cls!r} is not one of {sorted(PIPELINES)}")
    if index.get("expand_timesteps"):
        raise ConfigError(f"{index_path}: expand_timesteps (Wan2.2 TI2V-5B) is not supported")

    def present(name):
        return isinstance(index.get(name), list) and index[name][0] is not None

    if not present("transformer"):
        raise ConfigError(f"{index_path} has no transformer")
    has_2 = present("transformer_2")
    if has_2 and index.get("boundary_ratio") is None:
        raise ConfigError(f"{index_path} has transformer_2 but no boundary_ratio")
    scheduler_file = "scheduler_config.json"
    return PipelineFolder(
        path=folder,
        kind=PIPELINES[cls],
        cls=cls,
        index=index,
        transformer=_config(folder, "transformer"),
        transformer_2=_config(folder, "transformer_2") if has_2 else None,
        vae=_config(folder, "vae"),
        text_encoder=_config(folder, "text_encoder"),
        scheduler=_config(folder, "scheduler", scheduler_file),
        image_encoder=_config(folder, "image_encoder") if present("image_encoder") else None,
    )


# --- checks and the teacher spec (configs only) ----------------------------------------------


def _mismatch(what: str, ours, what_else: str, theirs) -> ConfigError:
    return ConfigError(f"{what} {ours} does not match {what_else} {theirs}")


def text_width(pipe: PipelineFolder) -> int:
    """Width of the text encoder's hidden states (umT5 d_model, Qwen2.5-VL hidden_size)."""
    config = pipe.text_encoder
    if pipe.is_wan:
        return config["d_model"]
    return config.get("text_config", config)["hidden_size"]


def vae_factors(pipe: PipelineFolder) -> tuple[int, int]:
    """(temporal, spatial) downscaling of the VAE, as the pipelines compute them."""
    if pipe.is_wan:  # WanPipeline.__init__
        return pipe.vae.get("scale_factor_temporal", 4), pipe.vae.get("scale_factor_spatial", 8)
    return 1, 2 ** len(pipe.vae["temperal_downsample"])  # QwenImagePipeline.__init__


def default_size(pipe: PipelineFolder) -> tuple[int, int, int]:
    """(height, width, frames) the pipeline generates when not told."""
    if pipe.is_wan:
        return tuple(pipe.call_default(k) for k in ("height", "width", "num_frames"))
    side = QWEN_SAMPLE_SIZE * vae_factors(pipe)[1]
    return side, side, 1


def check(pipe: PipelineFolder, height: int, width: int, frames: int) -> tuple[int, int, int, int]:
    """The latent shape (C, F, H, W) of a (frames x) height x width sample, after checking that
    the pipeline's parts agree with each other and with that size. Raises ConfigError naming
    both values of the first mismatch."""
    t = pipe.transformer
    z = pipe.vae["z_dim"]
    temporal, spatial = vae_factors(pipe)
    if t["out_channels"] != z:
        raise _mismatch("transformer out_channels", t["out_channels"], "vae z_dim", z)
    if pipe.is_wan:
        patch_f, patch_h, patch_w = t["patch_size"]
        expected_in = z if pipe.kind == "wan_t2v" else 2 * z + temporal  # + mask + image latent
        in_name = "vae z_dim" if pipe.kind == "wan_t2v" else "2 x vae z_dim + mask channels"
        text_name = "transformer text_dim"
        text_dim = t["text_dim"]
    else:
        patch_f, patch_h = 1, t["patch_size"]
        patch_w = patch_h
        expected_in = z * patch_h * patch_w  # 2x2 latent patches packed on channels
        in_name = "vae z_dim x patch area"
        text_name = "transformer joint_attention_dim"
        text_dim = t["joint_attention_dim"]
    if t["in_channels"] != expected_in:
        raise _mismatch("transformer in_channels", t["in_channels"], in_name, expected_in)
    if text_width(pipe) != text_dim:
        raise _mismatch("text_encoder width", text_width(pipe), text_name, text_dim)
    if pipe.transformer_2 is not None:
        for key in ("in_channels", "out_channels", "text_dim", "patch_size", "image_dim"):
            if pipe.transformer_2.get(key) != t.get(key):
                raise _mismatch(
                    f"transformer_2 {key}", pipe.transformer_2.get(key), "transformer's", t.get(key)
                )
    image_dim = t.get("image_dim")
    if pipe.kind == "wan_i2v" and image_dim is not None:
        if pipe.image_encoder is None:
            raise ConfigError(
                f"transformer image_dim {image_dim} needs CLIP image tokens, but the pipeline "
                "has no image_encoder"
            )
        clip_width = pipe.image_encoder.get("vision_config", pipe.image_encoder)["hidden_size"]
        if clip_width != image_dim:
            raise _mismatch(
                "image_encoder hidden_size", clip_width, "transformer image_dim", image_dim
            )
    if pipe.is_wan:
        if frames < 1 or (frames - 1) % temporal:
            raise ConfigError(
                f"--frames {frames} must be 1 + a multiple of the VAE's temporal factor {temporal}"
            )
    elif frames != 1:
        raise ConfigError(f"--frames {frames}: Qwen-Image makes single images (frames 1)")
    latent_frames = (frames - 1) // temporal + 1
    for name, side, patch in (("height", height, patch_h), ("width", width, patch_w)):
        if side < 1 or side % (spatial * patch):
            raise ConfigError(
                f"--{name} {side} must be a multiple of the VAE factor x patch size "
                f"{spatial} x {patch} = {spatial * patch}"
            )
    if latent_frames % patch_f:
        raise _mismatch("latent frames", latent_frames, "patch size", patch_f)
    return z, latent_frames, height // spatial, width // spatial


def schedule_shift(pipe: PipelineFolder, latent_shape) -> float:
    """The timestep shift s of the pipeline's scheduler (sigma -> s sigma / (1 + (s-1) sigma)):
    UniPC's `flow_shift`, FlowMatchEuler's `shift`, or with dynamic shifting (Qwen-Image) the
    shift its pipeline computes for this resolution (exp(mu), calculate_shift in
    pipeline_qwenimage.py). FlowMatchEuler's `shift_terminal` stretch is not represented."""
    config = pipe.scheduler
    name = config.get("_class_name")
    if name == "UniPCMultistepScheduler" and config.get("use_flow_sigmas"):
        return float(config["flow_shift"])
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ConfigError(f"scheduler {name!r} is not a flow-matching scheduler this reads")
    if not config.get("use_dynamic_shifting"):
        return float(config["shift"])
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    _, _, height, width = latent_shape
    mu = calculate_shift(
        (height // 2) * (width // 2),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


def teacher_spec(pipe: PipelineFolder, latent_shape) -> TeacherSpec:
    """teacher.yaml for `pipe` at `latent_shape`: its shift, default steps and guidance, and
    paths to its folder and transformer(s) (absolute, so the teacher directory can move)."""
    guidance = pipe.call_default("guidance_scale" if pipe.is_wan else "true_cfg_scale")
    root = pipe.path.resolve()
    two = pipe.transformer_2 is not None
    return TeacherSpec(
        latent_shape=tuple(latent_shape),
        shift=schedule_shift(pipe, latent_shape),
        guidance_scale=float(guidance),
        sampling_steps=int(pipe.call_default("num_inference_steps")),
        pipeline=str(root),
        transformer=str(root / "transformer"),
        transformer_2=str(root / "transformer_2") if two else None,
        boundary_ratio=float(pipe.index["boundary_ratio"]) if two else None,
    )


# --- inputs ----------------------------------------------------------------------------------


def read_prompts(path: Path) -> tuple[list[str], list[str | None]]:
    """(prompts, image names): one prompt per non-empty line; a line `IMAGE<TAB>prompt` names
    its first frame (a file in --images), otherwise images go with prompts in sorted order."""
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    prompts, names = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, tab, text = line.partition("\t")
        prompts.append(text.strip() if tab else line.strip())
        names.append(name.strip() if tab else None)
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts, names


def match_images(
    pipe: PipelineFolder, images: Path | None, names: list[str | None]
) -> list[Path] | None:
    """The first-frame file of each prompt (I2V), by name or by sorted order."""
    if pipe.kind != "wan_i2v":
        if images is not None:
            raise ConfigError(f"--images is for image-to-video pipelines, not {pipe.cls}")
        return None
    if images is None or not images.is_dir():
        raise ConfigError(f"{pipe.cls} needs --images DIR (the first frames), got {images}")
    if any(name is not None for name in names):
        files = [images / name if name else None for name in names]
        for line, file in enumerate(files, 1):
            if file is None or not file.is_file():
                raise ConfigError(f"prompt {line} names no image in {images} ({file})")
        return files
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) != len(names):
        raise ConfigError(f"{images} holds {len(files)} images for {len(names)} prompts")
    return files


# --- encoding --------------------------------------------------------------------------------


class Encoder:
    """The pipeline without its transformers, encoding batches of conditions its own way."""

    def __init__(self, pipe: PipelineFolder, height: int, width: int, frames: int, texts):
        """`texts`: every prompt it will encode (Qwen-Image pads all to the longest)."""
        import diffusers

        self.pipe_info, self.height, self.width, self.frames = pipe, height, width, frames
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.type == "cuda"
        # bf16 text encoders on the GPU; the VAE and CLIP in float32, as Wan's I2V example loads
        dtype = {"default": torch.bfloat16, "vae": torch.float32, "image_encoder": torch.float32}
        # the transformers are not needed to encode; a pipeline without transformer_2
        # (Qwen-Image) warns about the keyword, so name only the ones it has
        skip = {"transformer": None}
        if pipe.transformer_2 is not None:
            skip["transformer_2"] = None
        if pipe.kind != "wan_i2v":
            skip["vae"] = None
        self.pipe = diffusers.DiffusionPipeline.from_pretrained(
            pipe.path, dtype=dtype if cuda else torch.float32, **skip
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.text_len = WAN_TEXT_TOKENS if pipe.is_wan else qwen_text_len(self.pipe, texts)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"text": [n, L, D]} (+ "text_mask" [n, L] for Qwen-Image) as the pipeline encodes."""
        if self.pipe_info.is_wan:
            embeds, _ = self.pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=WAN_TEXT_TOKENS,
                device=self.device,
            )
            return {"text": embeds.cpu()}
        embeds, mask = self.pipe.encode_prompt(
            prompts, device=self.device, max_sequence_length=QWEN_MAX_TOKENS
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = self.text_len - embeds.shape[1]
        return {
            "text": torch.nn.functional.pad(embeds, (0, 0, 0, pad)).cpu(),
            "text_mask": torch.nn.functional.pad(mask, (0, pad)).to(torch.int64).cpu(),
        }

    @torch.no_grad()
    def image(self, files: list[Path]) -> dict[str, torch.Tensor]:
        """{"image_latents": [n, 4 + C, F, H, W]} (+ "image_embeds" [n, T, D'] for Wan2.1),
        each image through WanImageToVideoPipeline.prepare_latents / encode_image."""
        from diffusers.utils import load_image

        pipe, out = self.pipe, {"image_latents": []}
        clip = pipe.image_encoder is not None
        if clip:
            out["image_embeds"] = []
        for file in files:
            image = load_image(str(file))
            pixels = pipe.video_processor.preprocess(image, height=self.height, width=self.width)
            _, condition = pipe.prepare_latents(
                pixels.to(self.device, dtype=torch.float32),
                1,
                pipe.vae.config.z_dim,
                self.height,
                self.width,
                self.frames,
                torch.float32,
                self.device,
            )
            out["image_latents"].append(condition.cpu())
            if clip:
                out["image_embeds"].append(pipe.encode_image(image, self.device).cpu())
        return {name: torch.cat(parts) for name, parts in out.items()}


def qwen_text_len(pipe, texts: list[str]) -> int:
    """Tokens kept of the longest prompt (QwenImagePipeline's template prefix dropped, capped at
    1024): the common length Qwen-Image embeddings are padded to. Tokenizer only."""
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    longest = 0
    for start in range(0, len(texts), 1024):
        ids = pipe.tokenizer([template.format(t) for t in texts[start : start + 1024]]).input_ids
        longest = max([longest, *map(len, ids)])
    return max(1, min(QWEN_MAX_TOKENS, longest - drop))


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


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def prepare(args) -> Path:
    out: Path = args.out
    pipe = read_pipeline(args.pipeline)
    height, width, frames = default_size(pipe)
    height, width = args.height or height, args.width or width
    frames = args.frames or frames
    args.height, args.width, args.frames = height, width, frames
    latent_shape = check(pipe, height, width, frames)
    spec = teacher_spec(pipe, latent_shape)
    prompts, names = read_prompts(args.prompts)
    images = match_images(pipe, args.images, names)
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
        run_file.write_text(json.dumps(run, indent=2) + "\n")

    batches = math.ceil(len(prompts) / args.batch_size)
    done = _done_shards(partial, batches)
    encoder = Encoder(pipe, height, width, frames, [*prompts, negative])
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
            _atomic_save(items, partial / cs.shard_name(index))
            bar.update(len(prompts[chunk]))
    uncond = {k: v[0] for k, v in encoder.text([negative]).items()}
    with safe_open(partial / cs.shard_name(0), framework="pt") as handle:
        specs = {name: handle.get_slice(name) for name in handle.keys()}
        specs = {
            name: (tuple(view.get_shape()[1:]), cs.SAFETENSORS_DTYPE_NAMES[view.get_dtype()])
            for name, view in specs.items()
        }
    counts = [min(args.batch_size, len(prompts) - i * args.batch_size) for i in range(batches)]
    cs.publish(partial, specs, counts, uncond, out / CONDITIONS_DIR)
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
    print(f"teacher directory {out} ({SPEC_FILE}, {CONDITIONS_DIR}/)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
