"""Architecture and execution configs of the DiTs.

The architecture configs use the field names of the diffusers configs (`config.json` of a
released checkpoint), so `WanConfig.from_diffusers(module.config)` is a copy and YAML files in
configs/ read like the checkpoints they describe. Load them with `phased_dmd_mp.config.load_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from phased_dmd_mp.config import ConfigError
from phased_dmd_mp.parallel.layout import check_model, sequence_parallel_on

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _from_mapping(cls, mapping: Any, ignored: set[str]):
    """Build `cls` from a diffusers config, refusing options this implementation lacks."""
    values = dict(mapping)
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(
        k for k in values if k not in fields and k not in ignored and not k.startswith("_")
    )
    if unknown:
        raise ConfigError(f"{cls.__name__} does not support the diffusers options {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{cls.__name__}: {error}") from error


@dataclass(frozen=True)
class WanConfig:
    """diffusers `WanTransformer3DModel` (Wan2.1 / Wan2.2; T2V, I2V, FLF2V, TI2V).

    I2V models take `in_channels` = 36 (latent + mask + image latent). Wan2.1 I2V also attends
    to CLIP image embeddings: `image_dim` (their width) and `added_kv_proj_dim` (= hidden size)
    are then set, and `pos_embed_seq_len` for first-last-frame models.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        _positive(self, "num_attention_heads", "attention_head_dim", "in_channels")
        _positive(self, "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers")
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even, got {self.attention_head_dim}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim and added_kv_proj_dim must be set together (Wan2.1 I2V)")
        if self.added_kv_proj_dim not in (None, self.hidden_size):
            raise ValueError(
                f"added_kv_proj_dim must equal the hidden size {self.hidden_size} (the image "
                f"embedder's output), got {self.added_kv_proj_dim}"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len needs image_dim (Wan2.1 FLF2V)")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config) -> WanConfig:
        # qk_norm: diffusers builds the same across-heads RMSNorm whatever its value.
        # rope_max_seq_len: our tables are computed for any grid, without a length cap.
        return _from_mapping(cls, config, ignored={"qk_norm", "rope_max_seq_len"})

    def to_diffusers(self) -> dict:
        values = dataclasses.asdict(self)
        values["patch_size"] = list(self.patch_size)
        return values


@dataclass(frozen=True)
class QwenImageConfig:
    """diffusers `QwenImageTransformer2DModel` (Qwen-Image, 20B at the defaults)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    def __post_init__(self):
        _positive(self, "patch_size", "in_channels", "out_channels", "num_layers")
        _positive(self, "attention_head_dim", "num_attention_heads", "joint_attention_dim")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(
            d % 2 for d in self.axes_dims_rope
        ):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                f"attention_head_dim {self.attention_head_dim}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_dim(self) -> int:
        """The MLP width of both streams (diffusers' FeedForward default, 4 x hidden)."""
        return 4 * self.hidden_size

    @classmethod
    def from_diffusers(cls, config) -> QwenImageConfig:
        for name in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if config.get(name, False):
                raise ConfigError(
                    f"QwenImageTransformer2DModel with {name}=True (an edit/layered variant) "
                    "is not supported; only the base Qwen-Image architecture is"
                )
        ignored = {"guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"}
        return _from_mapping(cls, config, ignored=ignored)

    def to_diffusers(self) -> dict:
        values = dataclasses.asdict(self)
        values["axes_dims_rope"] = list(self.axes_dims_rope)
        return values


@dataclass(frozen=True)
class ExecutionConfig:
    """How a DiT runs, independent of its architecture.

    dtype: parameter and activation dtype (norms, modulation and rotary math stay float32).
    recompute: recompute each layer's activations in backward instead of storing them.
    fp8: linear layers in FP8: "te" (Transformer Engine) or "torch" (torch._scaled_mm);
         GPU only (see phased_dmd_mp.parallel.fp8).
    sequence_parallel: split the token rows over the tensor-parallel ranks outside attention
         and the MLP (megatron's sequence parallelism; needs tensor parallel > 1). Context
         parallelism needs no switch here: it follows the process groups
         (parallel.state.initialize(..., context_parallel=N)).
    activation_offload: with recompute, what each layer keeps for backward (its input) waits
         in host memory and comes back for the layer's recompute (phased_dmd_mp.parallel.offload).
    """

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    recompute: bool = False
    fp8: Literal["off", "te", "torch"] = "off"
    sequence_parallel: bool = False
    activation_offload: bool = False

    def __post_init__(self):
        if self.activation_offload and not self.recompute:
            raise ConfigError(
                "activation_offload moves the layer inputs that recompute keeps: set recompute "
                "true or activation_offload false"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def megatron_config(
    arch: WanConfig | QwenImageConfig,
    execution: ExecutionConfig,
    tensor_parallel: int,
    pipeline_parallel: int,
    init_weights: bool,
    context_parallel: int = 1,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for a DiT on the given parallel layout (ConfigError
    when the layout does not divide the model: phased_dmd_mp.parallel.layout)."""
    check_model(arch, tensor_parallel, pipeline_parallel, context_parallel)
    sequence_parallel = sequence_parallel_on(execution.sequence_parallel, tensor_parallel)
    dtype = execution.torch_dtype
    std = 0.02
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        kv_channels=arch.attention_head_dim,
        ffn_hidden_size=arch.ffn_dim,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=partial(F.gelu, approximate="tanh"),
        bias_activation_fusion=False,
        use_cpu_initialization=True,
        perform_initialization=init_weights,
        init_method_std=std,
        init_method=partial(torch.nn.init.normal_, mean=0.0, std=std),
        output_layer_init_method=partial(
            torch.nn.init.normal_, mean=0.0, std=std / math.sqrt(2.0 * arch.num_layers)
        ),
        recompute_granularity="full" if execution.recompute else None,
        recompute_method="uniform" if execution.recompute else None,
        recompute_num_layers=1 if execution.recompute else None,
        cuda_graph_scope=[],  # the default "full" is deprecated (and warns); we use no graphs
    )


MODELS_DIR = Path(__file__).parents[2] / "configs" / "models"  # the released architectures


def architecture_file(name: str) -> Path:
    """configs/models/<name>.yaml for a name such as "wan2.1_t2v_14b"; a path to a YAML file
    (ending in .yaml or .yml) is taken as it is."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    return MODELS_DIR / f"{name}.yaml"


def read_architecture(name: str) -> WanConfig | QwenImageConfig:
    """The architecture `architecture_file(name)` describes (Qwen-Image's have
    joint_attention_dim). ConfigError when there is no such file or it is not one."""
    from phased_dmd_mp.config import load_config

    path = architecture_file(name)
    if not path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))
        raise ConfigError(f"architecture {name!r}: {path} does not exist; known: {known}")
    import yaml

    keys = yaml.safe_load(path.read_text()) or {}
    return load_config(QwenImageConfig if "joint_attention_dim" in keys else WanConfig, path)
