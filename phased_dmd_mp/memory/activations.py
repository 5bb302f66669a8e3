"""Activation memory of one DiT call, from a formula whose constants are measured.

A call of a pipeline stage with L layers on b samples of s image/video tokens and t text
tokens, with tensor parallelism tp, hidden size h and MLP width ffn, needs

    layer    bytes kept for backward by each layer (with recompute: its input only),
    train    the rest of a forward-backward call's peak: embedders, head and the backward's
             transient buffers (activation gradients, one weight gradient before it is
             added to `.grad`), independent of L,
    forward  the peak of a forward-only call (nothing is kept between layers),

so a training call peaks at `L * layer + train` above what was live before it, and a
forward-only call at `forward` (with activation_offload the layer inputs wait on the host and
the device holds one: `layer + train`). Each quantity is `sum_i c_i b x_i + sum_j d_j y_j` over
per-sample features x and per-call features y named in `QUANTITY_FEATURES` (s h: replicated
hidden-wide tensors; s h / tp: head-sharded ones; s ffn / tp: the sharded MLP hidden; t ...: the
text rows and their keys/values; s, t: per-token statistics of norms; h ffn / tp: the largest
weight gradient). Qwen-Image's text stream runs through every layer like the image stream, so
its s counts the text tokens too. Context parallelism gives each rank 1 / CP of the tokens
(attention trades them for 1 / CP of the heads: the same bytes); sequence parallelism splits
the replicated rows (s, s h) over TP as well (`local_tokens`).

The constants are fits to measurements by `python -m phased_dmd_mp.memory.calibrate`, stored in
`constants.json` next to this file per model kind, dtype, trained weights (full or LoRA) and
recompute, with each fit's largest relative residual. The per-layer formula is exact in float32
(residual 0) and within ~1% in bfloat16; the two peaks are maxima of several buffers (residuals
up to tens of percent for `train`, ~5% for `forward`), and `train` is small next to L layers.
LoRA is calibrated at the recipes' rank 64. Calibration uses head dim 128 and 2-3 heads per tensor-parallel rank,
like the released models, and no attention mask: SDPA then takes a fused path (no s x s scores),
as it does on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from phased_dmd_mp.models.config import QwenImageConfig, WanConfig

CONSTANTS_FILE = Path(__file__).with_name("constants.json")
HEAD_DIM = 128  # of every released Wan and Qwen-Image model
QUANTITY_FEATURES = {  # (per-sample features, per-call features)
    "layer": (("s", "s*h", "s*h/tp", "s*ffn/tp", "t", "t*h", "t*h/tp", "h", "1"), ()),
    "train": (("s*h", "s*h/tp", "s*ffn/tp", "t*h"), ("h*ffn/tp",)),
    "forward": (("s*h", "s*h/tp", "s*ffn/tp", "t*h"), ("h*ffn/tp",)),
}


@dataclass(frozen=True)
class CallShape:
    """What one DiT call sees: tokens per sample, text tokens, tensor parallel size, whether
    sequence parallelism splits the rows over it, and the context parallel size."""

    tokens: int
    text_tokens: int
    tensor_parallel: int
    sequence_parallel: bool = False
    context_parallel: int = 1


def kind_of(arch: WanConfig | QwenImageConfig) -> str:
    return "wan" if isinstance(arch, WanConfig) else "qwen_image"


def ffn_width(arch: WanConfig | QwenImageConfig) -> int:
    return arch.ffn_dim if isinstance(arch, WanConfig) else 4 * arch.hidden_size


def local_tokens(shape: CallShape, tokens: int) -> tuple[int, int]:
    """(rows of the replicated per-token tensors, tokens of the head- and FFN-sharded ones) on
    one rank: the tokens padded to a multiple of the ranks splitting them, over CP (Ulysses:
    attention sees all tokens but 1 / CP of the heads, the same bytes), and over TP for the
    replicated rows under sequence parallelism."""
    tp, cp = shape.tensor_parallel, shape.context_parallel
    split = cp * (tp if shape.sequence_parallel else 1)
    padded = -(-tokens // split) * split
    return padded // split, padded // cp


def _values(arch: WanConfig | QwenImageConfig, shape: CallShape) -> dict[str, float]:
    h, tp, t, ffn = arch.hidden_size, shape.tensor_parallel, shape.text_tokens, ffn_width(arch)
    rows, s = local_tokens(shape, shape.tokens + (t if isinstance(arch, QwenImageConfig) else 0))
    return {
        "s": rows, "s*h": rows * h, "s*h/tp": s * h / tp, "s*ffn/tp": s * ffn / tp,
        "t": t, "t*h": t * h, "t*h/tp": t * h / tp, "h": h, "1": 1, "h*ffn/tp": h * ffn / tp,
    }  # fmt: skip


def design_row(
    arch: WanConfig | QwenImageConfig, shape: CallShape, batch: int, quantity: str
) -> list[float]:
    """The features of `quantity` for a call on `batch` samples (per-sample ones times batch)."""
    values = _values(arch, shape)
    per_sample, per_call = QUANTITY_FEATURES[quantity]
    return [batch * values[n] for n in per_sample] + [float(values[n]) for n in per_call]


def constants_key(kind: str, dtype: str, adapter: str, recompute: bool) -> str:
    return f"{kind}/{dtype}/{adapter}/{'recompute' if recompute else 'no_recompute'}"


@cache
def _constants() -> dict:
    return json.loads(CONSTANTS_FILE.read_text())


def activation_bytes(
    arch: WanConfig | QwenImageConfig,
    shape: CallShape,
    batch: int,
    quantity: str,
    *,
    dtype: str,
    adapter: str = "full",
    recompute: bool = False,
) -> int:
    """Bytes of `quantity` ("layer", "train" or "forward") for a call on `batch` samples of
    `shape`; `adapter` "full" or "lora" (what the call trains; forward-only calls ignore it).
    float16 counts as bfloat16 (same sizes). KeyError: a combination never calibrated."""
    dtype = "bfloat16" if dtype == "float16" else dtype
    key = constants_key(kind_of(arch), dtype, adapter, recompute)
    coefficients = _constants()["fits"][key][quantity]
    row = design_row(arch, shape, batch, quantity)
    return max(0, round(sum(c * x for c, x in zip(coefficients, row, strict=True))))
