"""Measure the activation constants of `activations.py` and write `constants.json`.

    python -m phased_dmd_mp.memory.calibrate [--points 14] [--out phased_dmd_mp/memory/constants.json]

For each model kind, dtype, trained weights (full or LoRA) and recompute setting it builds
small random models (one and two layers; widths, heads, FFN, tokens, text tokens, batch and an
emulated tensor-parallel size of 1 or 2 varied over `--points` shapes), measures each call with
`LiveTensorBytes` and fits the per-sample constants by least squares. The largest relative
residual of each fit is stored with it (~0 for the per-layer bytes, which the formula describes
exactly; larger for the two peaks, which are maxima). About 2 minutes per key on an idle core;
`--only wan/bfloat16` recalibrates a subset.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from phased_dmd_mp.conditioning import Conditions, model_inputs, velocity_from_output
from scipy.optimize import nnls

from phased_dmd_mp.memory.activations import (
    CONSTANTS_FILE,
    HEAD_DIM,
    QUANTITY_FEATURES,
    CallShape,
    constants_key,
    design_row,
)
from phased_dmd_mp.memory.emulate import emulated_collectives, rank_groups
from phased_dmd_mp.memory.measure import LiveTensorBytes
from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build
from phased_dmd_mp.models.lora import add_lora, set_active_adapter
from phased_dmd_mp.parallel.cpu_compat import cuda_calls_on_cpu
from phased_dmd_mp.parallel.state import ensure_initialized


def small_arch(kind: str, rng: random.Random, layers: int, tp: int):
    # At least two heads per tensor-parallel rank, as in the released models (Wan 40 heads,
    # Qwen-Image 24): with one, some head views are contiguous and the kept bytes differ.
    heads, head_dim = tp * rng.choice([2, 3]), HEAD_DIM
    if kind == "wan":
        arch = WanConfig(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
            out_channels=4, text_dim=rng.choice([8, 24]), freq_dim=32,
            ffn_dim=2 * round(heads * head_dim * rng.uniform(1.25, 2)), num_layers=layers,
        )  # fmt: skip
    else:
        rope = (16, 56, 56)
        arch = QwenImageConfig(
            patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
            attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=rng.choice([8, 24]), axes_dims_rope=rope,
        )  # fmt: skip
    return arch


def _inputs(
    arch, batch: int, frames: int, size: int, text: int, dtype
) -> tuple[dict, torch.Tensor]:
    channels = 4
    frames = frames if isinstance(arch, WanConfig) else 1
    x = torch.randn(batch, channels, frames, size, size)
    cond = Conditions(text=torch.randn(batch, text, features_text_dim(arch)))
    return model_inputs(arch, x.to(dtype), torch.rand(batch), cond), x


def features_text_dim(arch) -> int:
    return arch.text_dim if isinstance(arch, WanConfig) else arch.joint_attention_dim


def measure_point(arch_args, layers, tp, batch, frames, size, text, dtype, adapter, recompute):
    """(kept after forward, peak of forward-backward, peak of forward-only) above the start,
    in bytes, of one call of a fresh model."""
    kind, seed = arch_args
    arch = small_arch(kind, random.Random(seed), layers, tp)
    execution = ExecutionConfig(dtype=dtype, recompute=recompute)
    model = build(arch, execution, rank_groups(tp, 0, 1, 0), init_weights=False)
    with torch.no_grad():  # the bytes do not depend on the values; zeros are fast to run
        for p in model.parameters():
            p.zero_()
    if adapter == "lora":
        add_lora(model, 64, 8.0, 1)  # the recipes' rank
        set_active_adapter(model, 0)
    inputs, x = _inputs(arch, batch, frames, size, text, model.dtype)

    def loss() -> torch.Tensor:
        return velocity_from_output(arch, model(**inputs), x).float().square().mean()

    # megatron's mappings allocate on torch.cuda.current_device(); "cpu" also serves the
    # recompute in backward, which runs outside the shim's function mode
    cpu_device = mock.patch.object(torch.cuda, "current_device", lambda: "cpu")
    with cuda_calls_on_cpu(), cpu_device, emulated_collectives():
        loss().backward()  # gradients allocated, as in every step after the first
        with LiveTensorBytes() as tracker:
            start = tracker.live
            value = loss()
            kept = tracker.live - start
            value.backward()
            del value
        train_peak = tracker.peak - start
        with torch.no_grad(), LiveTensorBytes() as tracker:
            start = tracker.live
            model(**inputs)
        forward_peak = tracker.peak - start
    shape = CallShape(inputs_tokens(arch, frames, size), text_tokens=text, tensor_parallel=tp)
    return arch, shape, kept, train_peak, forward_peak


def inputs_tokens(arch, frames: int, size: int) -> int:
    if isinstance(arch, WanConfig):
        return frames * (size // 2) ** 2
    return (size // 2) ** 2


def fit(kind: str, dtype: str, adapter: str, recompute: bool, points: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows = {q: [] for q in ("layer", "train", "forward")}
    targets = {q: [] for q in rows}
    for index in range(points):
        arch_seed = rng.randrange(1 << 30)
        tp, batch = rng.choice([1, 2]), rng.choice([1, 2])
        frames, size, text = rng.choice([1, 2, 3]), rng.choice([8, 12]), rng.randint(2, 24)
        common = (tp, batch, frames, size, text, dtype, adapter, recompute)
        arch, shape, kept1, peak1, fwd1 = measure_point((kind, arch_seed), 1, *common)
        _, _, kept2, peak2, _ = measure_point((kind, arch_seed), 2, *common)
        layer = kept2 - kept1
        for quantity, target in (("layer", layer), ("train", peak1 - layer), ("forward", fwd1)):
            rows[quantity].append(design_row(arch, shape, batch, quantity))
            targets[quantity].append(target)
    result = {}
    for quantity in rows:
        a, b = np.array(rows[quantity]), np.array(targets[quantity], dtype=float)
        if quantity == "layer":  # exact: per-token statistics may enter with either sign
            coefficients = np.linalg.lstsq(a, b, rcond=None)[0]
        else:  # maxima of several buffers: non-negative least squares
            coefficients = nnls(a, b)[0]
        predicted = a @ coefficients
        residual = float(np.max(np.abs(predicted - b) / np.maximum(b, 1)))
        result[quantity] = [round(float(c), 3) for c in coefficients]
        result[f"{quantity}_max_relative_residual"] = round(residual, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=14)
    parser.add_argument("--out", default=str(CONSTANTS_FILE))
    parser.add_argument(
        "--only", default="", help="calibrate only keys containing this, e.g. wan/bfloat16"
    )
    args = parser.parse_args()
    ensure_initialized()
    out = Path(args.out)
    for kind, dtype, adapter, recompute in itertools.product(
        ["wan", "qwen_image"], ["float32", "bfloat16"], ["full", "lora"], [False, True]
    ):
        key = constants_key(kind, dtype, adapter, recompute)
        if args.only not in key:
            continue
        result = fit(kind, dtype, adapter, recompute, args.points)
        print(key, {k: v for k, v in result.items() if "residual" in k}, flush=True)
        fits = json.loads(out.read_text())["fits"] if out.is_file() else {}  # keeps other keys
        fits[key] = result
        data = {
            "features": QUANTITY_FEATURES,
            "points": args.points,
            "fits": dict(sorted(fits.items())),
        }
        out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
