"""Qwen-Image MMDiT on megatron-core, the architecture of diffusers'
`QwenImageTransformer2DModel`.

Each layer keeps two streams, text and image, with their own adaLN modulation, q/k/v
projections, per-head q/k RMSNorm and GELU(tanh) MLPs, and joins them in one attention over
[text; image] with rotary positions (image: centred 2D plus frame index; text: after the image
extent). Activations are one [text + image tokens, b, hidden] tensor, so a pipeline stage sends
both streams at once. Projections, MLPs and the (large: 6 x hidden^2 per stream) modulation
linears are tensor-parallel. With sequence or context parallelism (parallel/sequence.py) each
stream is split (and padded) on its own, the tensor holds this rank's [text rows; image rows],
and the joint attention gathers both streams' whole sequences for its heads, joins them, attends
with the text mask and splits them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    all_gather_last_dim_from_tensor_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor, nn

from phased_dmd_mp.models.config import ExecutionConfig, QwenImageConfig, megatron_config
from phased_dmd_mp.models.dit import DiTStage, Rows
from phased_dmd_mp.models.layers import (
    GeluMLP,
    LinearSubmodules,
    RMSNorm,
    apply_rotary,
    column_linear,
    row_linear,
    timestep_embedding,
)
from phased_dmd_mp.models.rope import qwen_rotary
from phased_dmd_mp.models.wan import MLPEmbedding
from phased_dmd_mp.parallel.fp8 import layer_submodules
from phased_dmd_mp.parallel.sequence import SequenceShards, mark_sequence_parallel
from phased_dmd_mp.parallel.state import ensure_initialized

EPS = 1e-6
TIMESTEP_CHANNELS = 256


@dataclass
class QwenConditioning:
    text: SequenceShards  # this rank's rows of each stream
    image: SequenceShards
    temb: Tensor  # [1, b, hidden]
    image_rotary: tuple[Tensor, Tensor]  # of the whole streams
    text_rotary: tuple[Tensor, Tensor]
    mask: Tensor | None  # [b, 1, 1, text + image] bool, True = attend


class JointAttention(MegatronModule):
    def __init__(self, config, submodules: LinearSubmodules, tp_group):
        super().__init__(config)
        hidden, self.head_dim = config.hidden_size, config.kv_channels
        self.linear_qkv = column_linear(submodules, config, tp_group, hidden, 3 * hidden)
        self.linear_added_qkv = column_linear(submodules, config, tp_group, hidden, 3 * hidden)
        self.q_norm = RMSNorm(self.head_dim, EPS, tp_group)
        self.k_norm = RMSNorm(self.head_dim, EPS, tp_group)
        self.added_q_norm = RMSNorm(self.head_dim, EPS, tp_group)
        self.added_k_norm = RMSNorm(self.head_dim, EPS, tp_group)
        self.core_attention = submodules.core_attention()
        self.linear_proj = row_linear(submodules, config, tp_group, hidden, hidden)
        self.linear_added_proj = row_linear(submodules, config, tp_group, hidden, hidden)

    def _qkv(self, linear, q_norm, k_norm, x: Tensor, shards: SequenceShards, rotary):
        """One stream's q, k, v [whole stream, b, heads here, head_dim]."""
        qkv, _ = linear(x)
        q, k, v = qkv.unflatten(-1, (-1, 3, self.head_dim)).unbind(-2)
        q, k, v = shards.heads(q_norm(q)), shards.heads(k_norm(k)), shards.heads(v)
        return apply_rotary(q, *rotary), apply_rotary(k, *rotary), v

    def forward(self, image: Tensor, text: Tensor, cond: QwenConditioning):
        image_qkv = self._qkv(
            self.linear_qkv, self.q_norm, self.k_norm, image, cond.image, cond.image_rotary
        )
        text_qkv = self._qkv(
            self.linear_added_qkv,
            self.added_q_norm,
            self.added_k_norm,
            text,
            cond.text,
            cond.text_rotary,
        )
        joint = [torch.cat([t, i]) for t, i in zip(text_qkv, image_qkv)]
        out = self.core_attention(*joint, mask=cond.mask)
        text_out, image_out = out.split([cond.text.tokens, cond.image.tokens])
        image_out, _ = self.linear_proj(cond.image.rows(image_out))
        text_out, _ = self.linear_added_proj(cond.text.rows(text_out))
        return image_out, text_out


class QwenImageLayer(MegatronModule, BaseTransformerLayer):
    def __init__(
        self,
        config,
        submodules: LinearSubmodules,
        layer_number: int,
        pg_collection: ProcessGroupCollection,
        vp_stage=None,
    ):
        super().__init__(config)
        self.layer_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, get_pg_rank(pg_collection.pp)
        )
        tp, hidden = pg_collection.tp, config.hidden_size
        # Each rank computes a slice of the 6 x hidden modulation, then all ranks gather it.
        self.tp_group = tp
        self.img_modulation = column_linear(
            submodules, config, tp, hidden, 6 * hidden, whole_rows=True
        )
        self.txt_modulation = column_linear(
            submodules, config, tp, hidden, 6 * hidden, whole_rows=True
        )
        self.attention = JointAttention(config, submodules, tp)
        self.img_mlp = GeluMLP(config, submodules, tp, config.ffn_hidden_size)
        self.txt_mlp = GeluMLP(config, submodules, tp, config.ffn_hidden_size)

    def _modulation(self, linear, activated_temb: Tensor) -> Tensor:
        local, _ = linear(activated_temb)
        if self.config.sequence_parallel:  # it meets local rows: gradients reduce-scattered
            return all_gather_last_dim_from_tensor_parallel_region(local, group=self.tp_group)
        return gather_from_tensor_model_parallel_region(local, group=self.tp_group)

    @staticmethod
    def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale) + shift

    def forward(self, x: Tensor, cond: QwenConditioning) -> Tensor:
        text_rows = cond.text.local_rows
        text, image = x.split([text_rows, x.shape[0] - text_rows])
        activated = F.silu(cond.temb)
        img_mod = self._modulation(self.img_modulation, activated).chunk(6, dim=-1)
        txt_mod = self._modulation(self.txt_modulation, activated).chunk(6, dim=-1)

        image_out, text_out = self.attention(
            self._modulate(image, *img_mod[0:2]), self._modulate(text, *txt_mod[0:2]), cond
        )
        image = image + img_mod[2] * image_out
        text = text + txt_mod[2] * text_out

        image = image + img_mod[5] * self.img_mlp(self._modulate(image, *img_mod[3:5]))
        text = text + txt_mod[5] * self.txt_mlp(self._modulate(text, *txt_mod[3:5]))
        x = torch.cat([text, image])
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


def qwen_image_layer_spec(submodules: LinearSubmodules) -> ModuleSpec:
    return ModuleSpec(module=QwenImageLayer, submodules=submodules)


class QwenImageHead(nn.Module):
    def __init__(self, hidden: int, out_features: int):
        super().__init__()
        self.linear_modulation = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear_modulation(F.silu(temb)).chunk(2, dim=-1)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale) + shift)


class QwenImageDiT(DiTStage):
    """One pipeline stage of the Qwen-Image MMDiT (the whole model when pipeline_parallel = 1).

    Called like diffusers' `QwenImageTransformer2DModel` with its inputs (hidden_states,
    encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes); returns the
    packed velocity [b, image tokens, patch^2 * out_channels] on the last stage.
    """

    def __init__(
        self,
        arch: QwenImageConfig,
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
        super().__init__(config, qwen_image_layer_spec(submodules), pg_collection, execution)
        self.arch = arch
        hidden = arch.hidden_size
        if self.pre_process:
            self.img_in = nn.Linear(arch.in_channels, hidden)
            self.txt_norm = RMSNorm(arch.joint_attention_dim, EPS)
            self.txt_in = nn.Linear(arch.joint_attention_dim, hidden)
            self.time_embedding = MLPEmbedding(TIMESTEP_CHANNELS, hidden, nn.SiLU())
        if self.post_process:
            self.head = QwenImageHead(hidden, arch.patch_size**2 * arch.out_channels)
            mark_sequence_parallel(config, self.head)  # runs on local rows
        self.to(execution.torch_dtype)

    def rows(self, hidden_states, encoder_hidden_states, *args, **kwargs) -> Rows:
        """Row layout of the tensor this model's stages exchange for these inputs: this rank's
        text and image rows, the timestep embedding."""
        text = self.shards(encoder_hidden_states.shape[1]).local_rows
        return Rows(text + self.shards(hidden_states.shape[1]).local_rows, (1,))

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_mask: Tensor | None,
        timestep: Tensor,
        img_shapes: list,
    ) -> Tensor:
        shapes = self._image_shapes(hidden_states, encoder_hidden_states, timestep, img_shapes)
        text_len = encoder_hidden_states.shape[1]
        text_shards, image_shards = self.shards(text_len), self.shards(hidden_states.shape[1])
        if self.pre_process:
            text, image, temb = self._embed(hidden_states, encoder_hidden_states, timestep)
            carried = torch.cat([text_shards.scatter(text), image_shards.scatter(image), temb])
        else:
            carried = self.stage_input()
        tokens, (temb,) = self.rows(hidden_states, encoder_hidden_states).split(carried)
        image_rotary, text_rotary = qwen_rotary(
            shapes, text_len, self.arch.axes_dims_rope, device=tokens.device
        )
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = encoder_hidden_states_mask.new_ones(hidden_states.shape[:2])
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1).bool()
            mask = mask[:, None, None, :].to(tokens.device)
        cond = QwenConditioning(text_shards, image_shards, temb, image_rotary, text_rotary, mask)
        tokens = self.decoder(tokens, cond)
        if not self.post_process:
            return torch.cat([tokens, temb])
        image = tokens[text_shards.local_rows :]
        velocity = self.head(image, image_shards.conditioning(temb))
        return image_shards.gather(velocity).transpose(0, 1)

    def _embed(self, hidden_states: Tensor, text: Tensor, timestep: Tensor) -> list[Tensor]:
        """First stage: text tokens, image tokens and the timestep embedding, each [rows, b,
        hidden]."""
        image = self.img_in(hidden_states.to(self.dtype))
        timestep = timestep.to(self.dtype)  # as the reference: bf16 models see bf16 timesteps
        text = self.txt_in(self.txt_norm(text.to(self.dtype)))
        frequencies = timestep_embedding(timestep, TIMESTEP_CHANNELS, scale=1000.0)
        temb = self.time_embedding(frequencies.to(self.dtype))
        return [text.transpose(0, 1), image.transpose(0, 1), temb[None]]

    def _image_shapes(
        self, hidden_states, text, timestep, img_shapes
    ) -> list[tuple[int, int, int]]:
        arch = self.arch
        if hidden_states.ndim != 3 or hidden_states.shape[2] != arch.in_channels:
            raise ValueError(
                f"hidden_states must be packed latents [batch, tokens, {arch.in_channels}], "
                f"got {tuple(hidden_states.shape)}"
            )
        batch = hidden_states.shape[0]
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != arch.joint_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be [{batch}, text tokens, "
                f"{arch.joint_attention_dim}], got {tuple(text.shape)}"
            )
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be [{batch}], got {tuple(timestep.shape)}")
        # diffusers takes a list over the batch and uses its first entry for every sample.
        shapes = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
        shapes = [tuple(shapes)] if isinstance(shapes, tuple) else [tuple(s) for s in shapes]
        if sum(math.prod(s) for s in shapes) != hidden_states.shape[1]:
            raise ValueError(
                f"img_shapes {shapes} describe {sum(math.prod(s) for s in shapes)} tokens, "
                f"hidden_states has {hidden_states.shape[1]}"
            )
        return shapes
