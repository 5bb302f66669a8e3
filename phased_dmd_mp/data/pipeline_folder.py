"""Diffusers pipeline folders read from their configs alone (no weights): which pipeline a folder
holds, whether its parts agree with each other and with a requested size, and the teacher.yaml
that follows from them (data/teacher.py). `python -m phased_dmd_mp.prepare` starts here.

Supported: Wan2.1/2.2 text-to-video (`WanPipeline`), image-to-video (`WanImageToVideoPipeline`),
Wan2.2 TI2V (either class with `expand_timesteps`: one model for text- and image-to-video, the
first frame's latents standing in for frame 0) and Qwen-Image (`QwenImagePipeline`). Raises phased_dmd_mp.config.ConfigError naming the file or
both values of a mismatch.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.data.teacher import TeacherSpec

PIPELINES = {
    "WanPipeline": "wan_t2v",
    "WanImageToVideoPipeline": "wan_i2v",
    "QwenImagePipeline": "qwen_image",
}
WAN_TEXT_TOKENS = 512  # Wan's umT5 length (the I2V transformer splits image/text tokens at it)
QWEN_MAX_TOKENS = 1024  # QwenImagePipeline.encode_prompt's max_sequence_length
QWEN_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (latent patches per side)


@dataclass(frozen=True)
class PipelineFolder:
    """A diffusers pipeline folder described by its configs (no weights read)."""

    path: Path
    kind: str  # wan_t2v | wan_i2v | wan_ti2v (expand_timesteps) | qwen_image
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

    @property
    def takes_first_frames(self) -> bool:
        """Whether --images are first frames to condition on (image-to-video always, Wan2.2
        TI2V when given), rather than real data."""
        return self.kind in ("wan_i2v", "wan_ti2v")

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
        kind="wan_ti2v" if index.get("expand_timesteps") else PIPELINES[cls],
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
        concat = pipe.kind == "wan_i2v"  # + mask + image latent on channels
        expected_in = 2 * z + temporal if concat else z
        in_name = "2 x vae z_dim + mask channels" if concat else "vae z_dim"
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
