"""Wan2.1 / Wan2.2 video DiT on megatron-core, the architecture of diffusers'
`WanTransformer3DModel` (T2V, I2V with image-conditioning channels, Wan2.1 I2V/FLF2V image
embeddings, Wan2.2 TI2V per-token timesteps).

Each layer: adaLN-modulated self-attention with 3D rotary embeddings and q/k RMSNorm across all
heads, cross-attention to the text (plus, in Wan2.1 I2V, to the CLIP image tokens), and an
adaLN-modulated GELU(tanh) MLP. Norms and modulation are computed in float32 as in the
reference. Attention, MLP and q/k norms are tensor-parallel (each rank holds whole heads); the
embedders and the output head are small and replicated. With sequence or context parallelism
(parallel/sequence.py) the layers and the head work on this rank's token rows; the text, CLIP
image and (one timestep per sample) modulation rows stay whole; Wan2.2 TI2V's per-token
modulation rows split like the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor, nn

from phased_dmd_mp.models.config import ExecutionConfig, WanConfig, megatron_config
from phased_dmd_mp.models.dit import DiTStage, Rows
from phased_dmd_mp.models.layers import (
    GeluMLP,
    LayerNormFP32,
    LinearSubmodules,
    ShardedRMSNorm,
    apply_rotary,
    column_linear,
    layer_norm_fp32,
    row_linear,
    split_heads,
    timestep_embedding,
)
from phased_dmd_mp.models.rope import wan_rotary
from phased_dmd_mp.parallel.fp8 import layer_submodules
from phased_dmd_mp.parallel.sequence import SequenceShards, mark_sequence_parallel
from phased_dmd_mp.parallel.state import ensure_initialized


@dataclass
class WanConditioning:
    """What every layer reads besides its tokens (see dit.py for how it crosses stages)."""

    text: Tensor  # [text tokens, b, hidden]
    image: Tensor | None  # [image tokens, b, hidden] (Wan2.1 I2V) or None
    modulation: Tensor  # [6, 1 or local rows, b, hidden]: shift, scale, gate of attention, MLP
    rotary: tuple[Tensor, Tensor]  # of the whole sequence
    shards: SequenceShards  # this rank's token rows


class WanSelfAttention(MegatronModule):
    def __init__(self, config, submodules: LinearSubmodules, tp_group, eps: float):
        super().__init__(config)
        hidden, self.head_dim = config.hidden_size, config.kv_channels
        # Rows of linear_qkv are [q_h, k_h, v_h] per head, so a TP shard holds whole heads.
        self.linear_qkv = column_linear(submodules, config, tp_group, hidden, 3 * hidden)
        self.q_norm = ShardedRMSNorm(hidden, eps, tp_group)
        self.k_norm = ShardedRMSNorm(hidden, eps, tp_group)
        self.core_attention = submodules.core_attention()
        self.linear_proj = row_linear(submodules, config, tp_group, hidden, hidden)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], shards: SequenceShards):
        qkv, _ = self.linear_qkv(x)
        q, k, v = qkv.unflatten(-1, (-1, 3, self.head_dim)).unbind(-2)
        q = split_heads(self.q_norm(q.flatten(2)), self.head_dim)  # the norm spans all heads
        k = split_heads(self.k_norm(k.flatten(2)), self.head_dim)
        q, k, v = shards.heads(q), shards.heads(k), shards.heads(v)  # the whole sequence
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out, _ = self.linear_proj(shards.rows(self.core_attention(q, k, v)))
        return out


class WanCrossAttention(MegatronModule):
    def __init__(self, config, submodules: LinearSubmodules, tp_group, eps: float, image: bool):
        super().__init__(config)
        hidden, self.head_dim = config.hidden_size, config.kv_channels
        # Local query rows attend to the whole context: no sequence exchange is needed.
        self.linear_q = column_linear(submodules, config, tp_group, hidden, hidden)
        self.linear_kv = column_linear(
            submodules, config, tp_group, hidden, 2 * hidden, whole_rows=True
        )
        self.q_norm = ShardedRMSNorm(hidden, eps, tp_group)
        self.k_norm = ShardedRMSNorm(hidden, eps, tp_group)
        if image:
            self.linear_kv_image = column_linear(
                submodules, config, tp_group, hidden, 2 * hidden, whole_rows=True
            )
            self.k_norm_image = ShardedRMSNorm(hidden, eps, tp_group)
        self.core_attention = submodules.core_attention()
        self.linear_proj = row_linear(submodules, config, tp_group, hidden, hidden)

    def _keys_values(self, linear, norm, context: Tensor) -> tuple[Tensor, Tensor]:
        kv, _ = linear(context)
        k, v = kv.unflatten(-1, (-1, 2, self.head_dim)).unbind(-2)
        return split_heads(norm(k.flatten(2)), self.head_dim), v

    def forward(self, x: Tensor, text: Tensor, image: Tensor | None) -> Tensor:
        q = split_heads(self.q_norm(self.linear_q(x)[0]), self.head_dim)
        out = self.core_attention(q, *self._keys_values(self.linear_kv, self.k_norm, text))
        if image is not None:
            k, v = self._keys_values(self.linear_kv_image, self.k_norm_image, image)
            out = out + self.core_attention(q, k, v)
        out, _ = self.linear_proj(out)
        return out


class WanLayer(MegatronModule, BaseTransformerLayer):
    def __init__(
        self,
        config,
        submodules: LinearSubmodules,
        layer_number: int,
        pg_collection: ProcessGroupCollection,
        vp_stage=None,
        *,
        arch: WanConfig,
    ):
        super().__init__(config)
        self.layer_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, get_pg_rank(pg_collection.pp)
        )
        tp, hidden, eps = pg_collection.tp, config.hidden_size, arch.eps
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 6, hidden) / hidden**0.5)
        self.self_attention = WanSelfAttention(config, submodules, tp, eps)
        self.cross_attention_norm = LayerNormFP32(hidden, eps) if arch.cross_attn_norm else None
        self.cross_attention = WanCrossAttention(
            config, submodules, tp, eps, image=arch.added_kv_proj_dim is not None
        )
        self.mlp = GeluMLP(config, submodules, tp, arch.ffn_dim)
        mark_sequence_parallel(config, self.modulation, self.cross_attention_norm)

    def forward(self, x: Tensor, cond: WanConditioning) -> Tensor:
        table = self.modulation.float().transpose(0, 1)[:, :, None]  # [6, 1, 1, hidden]
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = table + cond.modulation.float()

        normed = (layer_norm_fp32(x, self.eps) * (1 + scale) + shift).to(x.dtype)
        x = (x.float() + self.self_attention(normed, cond.rotary, cond.shards) * gate).to(x.dtype)

        normed = x if self.cross_attention_norm is None else self.cross_attention_norm(x)
        x = x + self.cross_attention(normed, cond.text, cond.image)

        normed = (layer_norm_fp32(x, self.eps) * (1 + mlp_scale) + mlp_shift).to(x.dtype)
        return (x.float() + self.mlp(normed).float() * mlp_gate).to(x.dtype)


def wan_layer_spec(arch: WanConfig, submodules: LinearSubmodules) -> ModuleSpec:
    return ModuleSpec(module=WanLayer, params={"arch": arch}, submodules=submodules)


class MLPEmbedding(nn.Module):
    """linear_1 -> activation -> linear_2 (the timestep and text embedders)."""

    def __init__(self, in_features: int, hidden: int, activation):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.activation = activation
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> hidden (Wan2.1 I2V); FLF2V adds a position embedding over the
    first and last frames' tokens, which arrive as two batch entries per sample."""

    def __init__(self, image_dim: int, hidden: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm_in = LayerNormFP32(image_dim, 1e-5)
        self.linear_1 = nn.Linear(image_dim, image_dim)
        self.linear_2 = nn.Linear(image_dim, hidden)
        self.norm_out = LayerNormFP32(hidden, 1e-5)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))

    def forward(self, image: Tensor) -> Tensor:
        if self.pos_embed is not None:
            image = image.reshape(-1, self.pos_embed.shape[1], image.shape[-1]) + self.pos_embed
        x = self.linear_2(F.gelu(self.linear_1(self.norm_in(image))))
        return self.norm_out(x)


class WanHead(nn.Module):
    def __init__(self, hidden: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.randn(1, 2, hidden) / hidden**0.5)
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        table = self.modulation.float().transpose(0, 1)[:, :, None]  # [2, 1, 1, hidden]
        shift, scale = table + temb.float()
        return self.linear((layer_norm_fp32(x, self.eps) * (1 + scale) + shift).to(x.dtype))


class WanDiT(DiTStage):
    """One pipeline stage of a Wan DiT (the whole model when pipeline_parallel = 1).

    Called like diffusers' `WanTransformer3DModel` (same argument names and layouts); returns
    the velocity [b, out_channels, frames, height, width] on the last stage and the tensor to
    send on the others. Unlike diffusers it does not assume 512 text tokens to find the image
    tokens: they are passed separately, so any text length works.
    """

    def __init__(
        self,
        arch: WanConfig,
        execution: ExecutionConfig | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        init_weights: bool = True,
    ):
        execution = execution or ExecutionConfig()
        pg_collection = pg_collection or ensure_initialized()
        config = megatron_config(
            arch,
            execution,
            tensor_parallel=get_pg_size(pg_collection.tp),
            pipeline_parallel=get_pg_size(pg_collection.pp),
            init_weights=init_weights,
            context_parallel=get_pg_size(pg_collection.cp),
        )
        submodules = layer_submodules(execution.fp8)
        super().__init__(config, wan_layer_spec(arch, submodules), pg_collection, execution)
        self.arch = arch
        hidden = arch.hidden_size
        if self.pre_process:
            self.patch_embedding = nn.Conv3d(
                arch.in_channels, hidden, kernel_size=arch.patch_size, stride=arch.patch_size
            )
            self.time_embedding = MLPEmbedding(arch.freq_dim, hidden, nn.SiLU())
            self.time_projection = nn.Linear(hidden, 6 * hidden)
            self.text_embedding = MLPEmbedding(arch.text_dim, hidden, nn.GELU(approximate="tanh"))
            self.image_embedding = None
            if arch.image_dim is not None:
                self.image_embedding = WanImageEmbedding(
                    arch.image_dim, hidden, arch.pos_embed_seq_len
                )
        if self.post_process:
            self.head = WanHead(hidden, arch.out_channels * math.prod(arch.patch_size), arch.eps)
            mark_sequence_parallel(config, self.head)  # runs on local rows
        self.to(execution.torch_dtype)

    def rows(
        self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None
    ):
        """Row layout of the tensor this model's stages exchange for these inputs: this rank's
        token rows (and per-token modulation rows), the whole context and modulation rows."""
        local = self.shards(math.prod(self._grid(hidden_states))).local_rows
        times = local if timestep.ndim == 2 else 1
        image = self._image_tokens(encoder_hidden_states_image)
        return Rows(local, (encoder_hidden_states.shape[1], image, 6 * times, times))

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None = None,
    ) -> Tensor:
        self._check_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        args = (hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        grid = self._grid(hidden_states)
        shards = self.shards(math.prod(grid))
        if self.pre_process and self.post_process:  # one stage sends nothing: no concatenation
            tokens, text, image, modulation, temb = self._split(self._embed(*args), shards)
        else:
            if self.pre_process:
                carried = torch.cat(self._split(self._embed(*args), shards))
            else:
                carried = self.stage_input()
            tokens, (text, image, modulation, temb) = self.rows(*args).split(carried)
        cond = WanConditioning(
            text=text,
            image=image if image.shape[0] else None,
            modulation=modulation.unflatten(0, (6, -1)),
            rotary=wan_rotary(grid, self.arch.attention_head_dim, device=tokens.device),
            shards=shards,
        )
        tokens = self.decoder(tokens, cond)
        if not self.post_process:
            return torch.cat([tokens, text, image, modulation, temb])
        return self._unpatchify(shards.gather(self.head(tokens, temb)), grid)

    def _grid(self, hidden_states: Tensor) -> tuple[int, int, int]:
        return tuple(n // p for n, p in zip(hidden_states.shape[2:], self.arch.patch_size))

    def _image_tokens(self, image: Tensor | None) -> int:
        if image is None:
            return 0
        if self.arch.pos_embed_seq_len is not None:
            return self.arch.pos_embed_seq_len
        return image.shape[1]

    def _embed(self, hidden_states, timestep, text, image) -> list[Tensor]:
        """First stage: [tokens, text, image, modulation, temb], each [rows, b, hidden] (image
        has no rows without an image embedder), in the order stages concatenate them."""
        batch = hidden_states.shape[0]
        tokens = self.patch_embedding(hidden_states.to(self.dtype)).flatten(2).permute(2, 0, 1)
        # Contiguous, so the residual stream is: elementwise ops keep a permuted layout, and
        # megatron's tensor-parallel all-reduce skips a non-contiguous gradient (it reduces a
        # contiguous copy and returns the original).
        tokens = tokens.contiguous()
        frequencies = timestep_embedding(timestep.flatten(), self.arch.freq_dim).to(self.dtype)
        temb = self.time_embedding(frequencies)  # [b * times, hidden]
        modulation = self.time_projection(F.silu(temb))
        temb = temb.unflatten(0, (batch, -1)).transpose(0, 1)  # [times, b, hidden]
        modulation = modulation.unflatten(0, (batch, -1)).unflatten(-1, (6, -1))
        modulation = modulation.permute(2, 1, 0, 3).flatten(0, 1)  # [6 * times, b, hidden]
        text = self.text_embedding(text.to(self.dtype)).transpose(0, 1).contiguous()
        if self.image_embedding is None:
            image = tokens.new_zeros(0, batch, tokens.shape[-1])
        else:
            image = self.image_embedding(image.to(self.dtype)).transpose(0, 1)
        return [tokens, text, image, modulation, temb]

    @staticmethod
    def _split(embedded: list[Tensor], shards: SequenceShards) -> list[Tensor]:
        """`_embed`'s rows with the tokens (and per-token modulation rows) cut to this rank's;
        one timestep per sample: its modulation rows stay whole (they meet local rows only)."""
        tokens, text, image, modulation, temb = embedded
        tokens = shards.scatter(tokens)
        if temb.shape[0] == 1:
            modulation, temb = shards.conditioning(modulation, temb)
        else:  # Wan2.2 TI2V: [6 x tokens] rows, token-major within each of the 6 tables
            per_token = modulation.unflatten(0, (6, -1)).transpose(0, 1)
            modulation = shards.scatter(per_token).transpose(0, 1).flatten(0, 1)
            temb = shards.scatter(temb)
        return [tokens, text, image, modulation, temb]

    def _unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        frames, height, width = grid
        pt, ph, pw = self.arch.patch_size
        x = x.transpose(0, 1).reshape(-1, frames, height, width, pt, ph, pw, self.arch.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], frames * pt, height * ph, width * pw)

    def _check_inputs(self, hidden_states, timestep, text, image) -> None:
        arch = self.arch
        if hidden_states.ndim != 5 or hidden_states.shape[1] != arch.in_channels:
            raise ValueError(
                f"hidden_states must be [batch, {arch.in_channels}, frames, height, width], "
                f"got {tuple(hidden_states.shape)}"
            )
        if any(n % p for n, p in zip(hidden_states.shape[2:], arch.patch_size)):
            raise ValueError(
                f"frames/height/width {tuple(hidden_states.shape[2:])} must be multiples of "
                f"patch_size {arch.patch_size}"
            )
        batch, tokens = hidden_states.shape[0], math.prod(self._grid(hidden_states))
        if timestep.shape not in ((batch,), (batch, tokens)):
            raise ValueError(
                f"timestep must be [batch] or [batch, tokens] = [{batch}] or [{batch}, {tokens}], "
                f"got {tuple(timestep.shape)}"
            )
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != arch.text_dim:
            raise ValueError(
                f"encoder_hidden_states must be [{batch}, text tokens, {arch.text_dim}], "
                f"got {tuple(text.shape)}"
            )
        if (image is None) != (arch.image_dim is None):
            raise ValueError(
                "this model takes encoder_hidden_states_image (CLIP image tokens)"
                if image is None
                else "this model has no image embedder: pass encoder_hidden_states_image=None"
            )
