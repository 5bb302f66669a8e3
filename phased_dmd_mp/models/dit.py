"""What the Wan and Qwen-Image DiTs share: a pipeline stage built on megatron's TransformerBlock.

Pipeline stages exchange one [rows, batch, hidden] tensor (megatron's schedules send exactly
one). A DiT layer reads more than the tokens it updates: the adaLN modulation and the text
(and image) context, computed once by the first stage's embedders. So the first stage appends
those rows after the tokens and every stage passes them on unchanged; their gradients flow back
through the same sends to the embedders, which therefore live on the first stage only. The
rotary tables and masks are recomputed from the call's arguments on each stage (every stage's
forward receives the microbatch; non-first stages read only its shapes).

With sequence or context parallelism (parallel/sequence.py) the first stage embeds the inputs
whole and keeps this rank's token rows (`shards`), the stages send those, and the last stage's
head works on them before the whole output is gathered: inputs and outputs of a stage's forward
are the same on every layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor

from phased_dmd_mp.models.config import ExecutionConfig
from phased_dmd_mp.parallel import fp8
from phased_dmd_mp.parallel.offload import saved_tensors_on_host
from phased_dmd_mp.parallel.sequence import SequenceShards
from phased_dmd_mp.parallel.state import ensure_initialized


class DiTBlock(TransformerBlock):
    """This stage's layers, built from a layer spec by megatron's TransformerBlock.

    megatron's forward hands every layer a fixed argument list (attention mask, context, ...);
    a DiT layer takes its conditioning as one object instead, so the loop is our own: FP8
    autocast (Transformer Engine) around it, per-layer activation recompute as configured, the
    input each recomputed layer keeps for backward in host memory with activation_offload.
    """

    fp8: str = "off"
    activation_offload: bool = False
    # feature_tap(layer index in the whole model (0-based), its output [rows, b, hidden]) -> the
    # tensor the next layer reads: the discriminator head's hook on a fake model
    # (distill/discriminator.py). Called outside activation recompute, so once per forward.
    feature_tap: Callable[[int, Tensor], Tensor] | None = None

    def forward(self, hidden_states: Tensor, conditioning) -> Tensor:
        recompute = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        with fp8.autocast(self.fp8):
            for layer in self.layers:
                if recompute:
                    # the checkpoint saves only the layer input (its own hooks take what the
                    # layer saves inside), so the hooks here move exactly that to the host
                    kept = (
                        saved_tensors_on_host(hidden_states.device)
                        if self.activation_offload
                        else contextlib.nullcontext()
                    )
                    with kept:
                        hidden_states = fp8.checkpoint(
                            self.fp8, layer, hidden_states, conditioning
                        )
                else:
                    hidden_states = layer(hidden_states, conditioning)
                if self.feature_tap is not None:
                    hidden_states = self.feature_tap(layer.layer_number - 1, hidden_states)
        return hidden_states


@dataclass(frozen=True)
class Rows:
    """Row counts of the tensor a pipeline stage sends: the tokens the layers update, then
    the conditioning rows they read."""

    tokens: int
    conditioning: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.tokens + sum(self.conditioning)

    def split(self, carried: Tensor) -> tuple[Tensor, list[Tensor]]:
        tokens, *conditioning = carried.split([self.tokens, *self.conditioning], dim=0)
        # Copies of the few conditioning rows, which every layer reads: as views they would keep
        # the whole carried tensor (the first layer's input) alive under activation_offload.
        return tokens, [rows.clone() for rows in conditioning]


class DiTStage(MegatronModule):
    """Base of the DiT models: process groups, stage position, the decoder block, and the
    megatron pipeline hook `set_input_tensor`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        pg_collection: ProcessGroupCollection | None,
        execution: ExecutionConfig,
    ):
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.pg_collection = pg_collection or ensure_initialized()
        pp = self.pg_collection.pp
        self.pre_process = get_pg_rank(pp) == 0
        self.post_process = get_pg_rank(pp) == get_pg_size(pp) - 1
        self.input_tensor: Tensor | None = None
        self.decoder = DiTBlock(
            config,
            layer_spec,
            post_layer_norm=False,
            pre_process=self.pre_process,
            post_process=self.post_process,
            pg_collection=self.pg_collection,
        )
        self.decoder.fp8 = execution.fp8
        self.decoder.activation_offload = execution.activation_offload

    def shards(self, tokens: int) -> SequenceShards:
        """How a sequence of `tokens` rows splits on this rank's groups (parallel/sequence.py)."""
        groups = self.pg_collection
        return SequenceShards.of(tokens, groups.tp, groups.cp, self.config.sequence_parallel)

    def set_input_tensor(self, input_tensor: Tensor | list[Tensor] | None) -> None:
        """Called by megatron's schedules with the tensor received from the previous stage."""
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        self.input_tensor = input_tensor

    def stage_input(self) -> Tensor:
        if self.input_tensor is None:
            raise RuntimeError(
                "this pipeline stage has no input: run it through megatron's schedules "
                "(phased_dmd_mp.parallel.pipeline) or call set_input_tensor first"
            )
        return self.input_tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.config.params_dtype
