"""DiT forward + backward step: time, model TFLOP/s, MFU and peak memory, per variant, one run.

    python benchmarks/bench_model.py [--model configs/models/wan2.1_t2v_1.3b.yaml]
        [--latent 21 60 104] [--text-len 512] [--batch 1] [--dtype bfloat16]
        [--fp8 off torch te] [--recompute off on] [--steps 10] [--warmup 3]
        [--peak-tflops 989] [--json results.json]

Defaults: on a GPU, the Wan2.1 1.3B architecture at a 480p, 81-frame latent (21 x 60 x 104 ->
32760 tokens) with 512 text tokens in bfloat16; on a CPU, a tiny Wan (so the script is exercised
anywhere) in float32. Variants are every FP8 backend x recompute setting; each row gives the
median step time with its min-max, the speed-up over the first variant, model TFLOP/s (matmul
FLOPs of forward + backward = 3x forward, recompute not counted), MFU against the dense
bf16 peak of the device, and peak memory (GPU: allocated; CPU: the process's peak RSS so far).
A variant the machine cannot run (FP8 without an FP8 GPU) prints its refusal instead.
Qwen-Image: pass its config and `--latent 1 H W` (latent height, width; 2x2 patches).

    python benchmarks/bench_model.py --vs-diffusers [--rounds 5] [--steps 10] [--threads 1]

compares our Wan DiT with diffusers' `WanTransformer3DModel` holding the same weights (ours
loaded with `from_diffusers`), float32, at two sizes (VS_DIFFUSERS_SIZES): forward (no grad)
and forward + backward. Calls alternate between the two models; each round's ratio is ours /
diffusers (below 1: ours is faster), reported as median [min-max] over rounds, by the wall
clock and by the process's CPU time (the fairer clock when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from phased_dmd_mp.config import ConfigError, load_config
from phased_dmd_mp.models import ExecutionConfig, QwenImageConfig, WanConfig, build
from phased_dmd_mp.parallel.state import ensure_initialized

ROOT = Path(__file__).parents[1]
DEFAULT_GPU_MODEL = ROOT / "configs" / "models" / "wan2.1_t2v_1.3b.yaml"
TINY_WAN = WanConfig(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=2,
)
DENSE_BF16_PEAK_TFLOPS = {  # per device name fragment, most specific first
    "H100 PCIe": 756,
    "H100": 989,
    "H200": 989,
    "B200": 2250,
    "A100": 312,
    "L40S": 362,
}


def load_arch(path: Path):
    try:
        return load_config(WanConfig, path)
    except ConfigError:
        return load_config(QwenImageConfig, path)


def forward_flops(arch, tokens: int, text_len: int) -> float:
    """Matmul FLOPs of one sample's forward (2 per multiply-add), embedders and head included."""
    h = arch.hidden_size
    if isinstance(arch, WanConfig):
        patch = math.prod(arch.patch_size)
        per_layer = (
            2 * tokens * h * 3 * h + 4 * tokens * tokens * h + 2 * tokens * h * h  # self-attn
            + 2 * tokens * h * h + 2 * text_len * h * 2 * h + 4 * tokens * text_len * h
            + 2 * tokens * h * h  # cross-attn
            + 2 * tokens * h * arch.ffn_dim * 2  # MLP
        )  # fmt: skip
        edges = 2 * tokens * h * patch * (arch.in_channels + arch.out_channels)
        edges += 2 * text_len * h * (arch.text_dim + h)
        edges += 2 * h * (arch.freq_dim + h + 6 * h)  # timestep embedding and modulation
        return arch.num_layers * per_layer + edges
    joint = tokens + text_len
    per_layer = 2 * joint * h * 3 * h + 4 * joint * joint * h + 2 * joint * h * h
    per_layer += 2 * joint * h * 4 * h * 2 + 2 * 2 * h * 6 * h  # MLPs, modulation
    edges = 2 * tokens * h * (arch.in_channels + arch.patch_size**2 * arch.out_channels)
    edges += 2 * text_len * h * arch.joint_attention_dim
    edges += 2 * h * (256 + h + 2 * h)  # timestep embedding, output modulation
    return arch.num_layers * per_layer + edges


def make_inputs(arch, latent, text_len: int, batch: int, dtype, device):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    frames, height, width = latent
    if isinstance(arch, WanConfig):
        inputs = {
            "hidden_states": randn(batch, arch.in_channels, frames, height, width),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": randn(batch, text_len, arch.text_dim),
        }
        if arch.image_dim is not None:
            inputs["encoder_hidden_states_image"] = randn(batch, 257, arch.image_dim)
        tokens = math.prod(n // p for n, p in zip(latent, arch.patch_size))
        return inputs, tokens
    grid = (frames, height // arch.patch_size, width // arch.patch_size)
    tokens = math.prod(grid)
    inputs = {
        "hidden_states": randn(batch, tokens, arch.in_channels),
        "encoder_hidden_states": randn(batch, text_len, arch.joint_attention_dim),
        "encoder_hidden_states_mask": None,
        "timestep": torch.full((batch,), 0.5, device=device),
        "img_shapes": [[grid]] * batch,
    }
    return inputs, tokens


# (name, architecture, latent, text tokens): a tiny model, then a wider one with Wan's real
# head dimension (128), both small enough for a CPU.
VS_DIFFUSERS_SIZES = (
    ("hidden 128, 2 layers, 192 tokens", TINY_WAN, (3, 16, 16), 32),
    (
        "hidden 512, 2 layers, 256 tokens",
        WanConfig(num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
                  text_dim=256, freq_dim=256, ffn_dim=2048, num_layers=2),
        (4, 16, 16),
        64,
    ),
)  # fmt: skip


def vs_diffusers(rounds: int, steps: int) -> list[dict]:
    """Ours / diffusers step-time ratios, forward and forward + backward, per size."""
    import diffusers

    from phased_dmd_mp.models import from_diffusers

    rows = []
    for name, arch, latent, text_len in VS_DIFFUSERS_SIZES:
        torch.manual_seed(0)
        reference = diffusers.WanTransformer3DModel(**arch.to_diffusers())
        ours = from_diffusers(reference)
        inputs, _ = make_inputs(arch, latent, text_len, 1, torch.float32, "cpu")
        models = {"ours": ours, "diffusers": lambda **kw: reference(**kw).sample}

        def forward(model):
            with torch.no_grad():
                model(**inputs)

        def forward_backward(model):
            ours.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            model(**inputs).square().mean().backward()

        for fn in (forward, forward_backward):
            for model in models.values():
                fn(model)  # warm-up
        for mode, fn in (("forward", forward), ("forward+backward", forward_backward)):
            row = {"size": name, "mode": mode}
            for clock in ("wall", "cpu"):
                row[clock] = {"ours_ms": [], "diffusers_ms": [], "ratio": []}
            for _ in range(rounds):  # a round: `steps` calls of each, alternating
                pairs = [(time_call(fn, ours), time_call(fn, models["diffusers"]))
                         for _ in range(steps)]  # fmt: skip
                for index, clock in enumerate(("wall", "cpu")):
                    a = statistics.median(p[0][index] for p in pairs)
                    b = statistics.median(p[1][index] for p in pairs)
                    row[clock]["ours_ms"].append(1e3 * a)
                    row[clock]["diffusers_ms"].append(1e3 * b)
                    row[clock]["ratio"].append(a / b)
            rows.append(row)
    return rows


def time_call(fn, model) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(model)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(model)
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_steps(model, inputs, device: str, steps: int, warmup: int) -> list[float]:
    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs).float().square().mean().backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", type=Path, help="architecture YAML (configs/models/)")
    parser.add_argument("--latent", type=int, nargs=3, metavar=("F", "H", "W"))
    parser.add_argument("--text-len", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"])
    parser.add_argument("--fp8", nargs="+", default=["off", "torch", "te"])
    parser.add_argument("--recompute", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for the MFU column")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--vs-diffusers", action="store_true", help="ours vs diffusers' Wan, same weights"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (--vs-diffusers)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_diffusers:
        ensure_initialized()
        print(
            f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, float32; load "
            f"average at start {os.getloadavg()}; {args.rounds} interleaved rounds of "
            f"{args.steps} alternating calls; ratio = ours / diffusers, median [min-max] over "
            "rounds; wall clock and this process's CPU time (less sensitive to other load)\n"
        )
        print("| size | pass | clock | ours (ms) | diffusers (ms) | ours / diffusers |")
        print("|---|---|---|---|---|---|")
        rows = vs_diffusers(args.rounds, args.steps)
        for r in rows:
            for clock in ("wall", "cpu"):
                c = r[clock]
                ratio = c["ratio"]
                print(
                    f"| {r['size']} | {r['mode']} | {clock} | "
                    f"{statistics.median(c['ours_ms']):.1f} | "
                    f"{statistics.median(c['diffusers_ms']):.1f} | {statistics.median(ratio):.3f} "
                    f"[{min(ratio):.3f}-{max(ratio):.3f}] |"
                )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return 0

    device = "cuda" if cuda else "cpu"
    if args.model is not None:
        arch = load_arch(args.model)
    else:
        arch = load_arch(DEFAULT_GPU_MODEL) if cuda else TINY_WAN
    latent = args.latent or ((21, 60, 104) if cuda else (3, 16, 16))
    text_len = args.text_len or (512 if cuda else 32)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or next(
        (tflops for key, tflops in DENSE_BF16_PEAK_TFLOPS.items() if key in name), None
    )

    ensure_initialized()
    inputs, tokens = make_inputs(arch, latent, text_len, args.batch, getattr(torch, dtype), device)
    flops = 3 * args.batch * forward_flops(arch, tokens, text_len)
    print(
        f"{name}, torch {torch.__version__}, {dtype}: {type(arch).__name__} "
        f"hidden {arch.hidden_size} x {arch.num_layers} layers, batch {args.batch}, "
        f"{tokens} tokens + {text_len} text, {flops / 1e12:.3f} TFLOP per step\n"
    )
    print(
        "| variant | step (ms) median [min-max] | speed | model TFLOP/s | MFU | peak memory (GiB) |"
    )
    print("|---|---|---|---|---|---|")
    rows, reference = [], None
    for fp8 in args.fp8:
        for recompute in args.recompute:
            variant = (
                f"{'fp8 ' + fp8 if fp8 != 'off' else dtype}{' + recompute' * (recompute == 'on')}"
            )
            execution = ExecutionConfig(dtype=dtype, recompute=recompute == "on", fp8=fp8)
            try:
                model = build(arch, execution).to(device)
            except ConfigError as error:
                print(f"| {variant} | refused: {error} | | | | |")
                rows.append({"variant": variant, "refused": str(error)})
                continue
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times = time_steps(model, inputs, device, args.steps, args.warmup)
            median = statistics.median(times)
            reference = reference or median
            tflops = flops / median / 1e12
            mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
            memory = peak_memory_gib(device)
            print(
                f"| {variant} | {1e3 * median:.1f} [{1e3 * min(times):.1f}-{1e3 * max(times):.1f}]"
                f" | {reference / median:.2f}x | {tflops:.2f} | {mfu} | {memory:.2f} |"
            )
            rows.append(
                {"variant": variant, "device": name, "step_s": times, "model_tflops": tflops,
                 "mfu": tflops / peak if peak else None, "peak_memory_gib": memory}
            )  # fmt: skip
            del model
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
