"""The adversarial lever's discriminator: a small head on a fake model's intermediate features.

DMD2 (Yin et al., 2024) attaches a classifier to its fake score model's features and adds a
non-saturating GAN loss; NVlabs FastGen and NeMo DFM's DMD branch do the same on a DiT with the
features of a few layers (FastGen on Wan: blocks 15, 22, 29, generator weight 0.03). Here each
fake expert (a copy of a teacher expert) gets one `DiscriminatorHead`: per tapped layer, on that
layer's output tokens h [rows, b, hidden]

    logit_b = w2 . mean_rows silu(W1 LayerNorm(h_b) + b1) + b2,

with W1 [hidden, hidden] column-parallel and w2 [1, hidden] row-parallel over the fake's tensor
parallel group (megatron's copy-to / reduce-from mappings, as lora.py's adapters), so the head is
sharded like the fake; under sequence or context parallelism the layer's token rows are gathered
for the mean (the mean does not depend on their order); under pipeline parallelism a layer's
head lives on the stage that holds the layer. Its parameters are float32 whatever the model
dtype (bf16 features are upcast), made from one seeded draw of the whole tensors, so every
parallel layout starts from the same head.

A `FeatureTap` is the fake stage's `DiTBlock.feature_tap` (models/dit.py) and does nothing until
a mode is set:
  score      record each tapped layer's logits, computed on detached features with the head's
             gradient on: the discriminator step (phased_dmd_mp/distill/levers.py) then trains
             the head alone on real and generated latents (FastGen's choice; DMD2 also trains
             the fake's encoder with it). The fake model's parameters get nothing.
  generator  the generator's loss softplus(-logit_b) / layers per sample: the tap adds its
             gradient with respect to h to whatever flows back through h (a side loss, so it
             works through megatron's pipeline schedules, whose loss sits on the last stage)
             and records the values.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor, nn

from phased_dmd_mp.models.dit import DiTStage

LAYER_NORM_EPS = 1e-6


def _whole(shape: tuple[int, ...], seed: int, name: str, std: float) -> Tensor:
    """A seeded normal draw of a whole head tensor: the same on every rank and layout."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return torch.randn(shape, generator=generator) * std


class DiscriminatorHead(nn.Module):
    """The head of one fake expert (module docstring): parameters for the tapped `layers` this
    pipeline stage holds; `num_layers` counts the tapped layers of the whole model. Under
    sequence parallelism (tokens split over the TP group) and context parallelism (over the CP
    group) the tokens are gathered for the mean, so every layout gives the same logits."""

    def __init__(
        self,
        hidden: int,
        layers: tuple[int, ...],
        num_layers: int,
        seed: int,
        name: str,
        *,
        tp_group,
        cp_group=None,
        sequence_parallel: bool = False,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.tp_group, self.cp_group, self.sequence_parallel = tp_group, cp_group, sequence_parallel
        tp, rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        self.layers, self.num_layers = tuple(layers), num_layers
        self.W1, self.b1, self.w2, self.b2 = (nn.ParameterList() for _ in range(4))
        for layer in self.layers:
            tag = f"{name}/layer{layer}"
            W1 = _whole((hidden, hidden), seed, f"{tag}/W1", hidden**-0.5).chunk(tp, 0)[rank]
            w2 = _whole((1, hidden), seed, f"{tag}/w2", hidden**-0.5).chunk(tp, 1)[rank]
            for values, params in ((W1, self.W1), (torch.zeros(hidden // tp), self.b1)):
                params.append(nn.Parameter(values.to(device).contiguous()))
                set_tensor_model_parallel_attributes(params[-1], True, 0, 1)
            self.w2.append(nn.Parameter(w2.to(device).contiguous()))
            set_tensor_model_parallel_attributes(self.w2[-1], True, 1, 1)
            self.b2.append(nn.Parameter(torch.zeros(1, device=device)))

    @classmethod
    def of_stage(cls, stage: DiTStage, layers: tuple[int, ...], seed: int, name: str):
        """The head for `stage` (a fake expert's pipeline stage) with its groups and layout."""
        here = {layer.layer_number - 1 for layer in stage.decoder.layers}
        return cls(
            stage.config.hidden_size,
            tuple(layer for layer in layers if layer in here),
            len(layers),
            seed,
            name,
            tp_group=stage.pg_collection.tp,
            cp_group=getattr(stage.pg_collection, "cp", None),
            sequence_parallel=bool(stage.config.sequence_parallel),
            device=next(stage.parameters()).device,
        )

    def logits(self, layer: int, h: Tensor) -> Tensor:
        """Logits [b] of the tapped layer `layer`'s output h [rows, b, hidden] (this rank's
        rows under sequence or context parallelism; float32)."""
        i = self.layers.index(layer)
        x = F.layer_norm(h.float(), h.shape[-1:], eps=LAYER_NORM_EPS)
        if self.sequence_parallel:  # backward: reduce-scatter of the column shards' parts
            x = gather_from_sequence_parallel_region(x, group=self.tp_group)
        else:  # backward: all-reduce of the column shards' parts
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        if self.cp_group is not None and get_pg_size(self.cp_group) > 1:
            # every CP rank computes the same loss: backward keeps its own rows' gradient
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.cp_group
            )
        pooled = F.silu(F.linear(x, self.W1[i], self.b1[i])).mean(dim=0)  # [b, hidden / tp]
        out = reduce_from_tensor_model_parallel_region(F.linear(pooled, self.w2[i]), self.tp_group)
        return (out + self.b2[i]).squeeze(-1)


class _AddGradient(torch.autograd.Function):
    """Identity whose backward adds a fixed gradient: a side loss's gradient entering a graph."""

    @staticmethod
    def forward(ctx, h: Tensor, extra: Tensor) -> Tensor:
        ctx.extra = extra
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad + ctx.extra.to(grad.dtype), None


class FeatureTap:
    """A fake stage's feature tap (module docstring); `mode` None, "score" or "generator";
    `records` the logits (score) or per-sample generator losses [b] of the calls so far."""

    def __init__(self, head: DiscriminatorHead):
        self.head, self.mode, self.records = head, None, []

    def __call__(self, layer: int, h: Tensor) -> Tensor:
        if self.mode is None or layer not in self.head.layers:
            return h
        with torch.enable_grad():
            if self.mode == "score":
                self.records.append(self.head.logits(layer, h.detach()))
                return h
            leaf = h.detach().requires_grad_()
            loss = F.softplus(-self.head.logits(layer, leaf)) / self.head.num_layers
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        self.records.append(loss.detach())
        return _AddGradient.apply(h, grad)
