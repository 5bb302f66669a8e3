"""Which weight-free optical flow reads motion right: OpenCV's DIS (medium and fast presets) and
Farneback on a smooth random texture translated by d pixels per frame (known motion), at
several frame sizes, and the time per frame pair relative to DIS medium in the same run.

    python benchmarks/bench_flow.py [--sizes 16 32 64 256 480x832] [--shifts 0 0.5 1 3 5]

Prints, per size and estimator, the measured mean flow over the true d (1.00 = exact; for
d = 0 the flow itself) and the time per pair over DIS medium's. The evaluation's default
(phased_dmd_mp/eval/motion.py) is the estimator this table favours.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.ndimage import gaussian_filter


def texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture (blur scaled to the frame) in 0..255, float32, with a margin of
    20 pixels on each side for the translation."""
    sigma = max(1.5, min(height, width) / 32)
    field = gaussian_filter(rng.standard_normal((height + 40, width + 40)), sigma)
    return (255 * (field - field.min()) / (field.max() - field.min())).astype(np.float32)


def estimators(cv2):
    dis = {
        name: cv2.DISOpticalFlow_create(preset)
        for name, preset in (
            ("DIS medium", cv2.DISOPTICAL_FLOW_PRESET_MEDIUM),
            ("DIS fast", cv2.DISOPTICAL_FLOW_PRESET_FAST),
        )
    }

    def farneback(a, b):  # OpenCV's documented example parameters
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    return {
        "DIS medium": lambda a, b: dis["DIS medium"].calc(a, b, None),
        "DIS fast": lambda a, b: dis["DIS fast"].calc(a, b, None),
        "Farneback": farneback,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["16", "32", "64", "256", "480x832"],
                        help="frame sizes, N or HxW")  # fmt: skip
    parser.add_argument("--shifts", nargs="+", type=float, default=[0, 0.5, 1, 3, 5],
                        help="true motion d in pixels per frame")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="of the texture")
    args = parser.parse_args()
    import cv2

    rng = np.random.default_rng(args.seed)
    methods = estimators(cv2)
    shifts = " | ".join(f"d={d:g}" for d in args.shifts)
    print(f"| size | estimator | {shifts} | time vs DIS medium |")
    print("|---|---|" + "---|" * (len(args.shifts) + 1))
    for size in args.sizes:
        height, width = (int(v) for v in (size.split("x") if "x" in size else (size, size)))
        source = texture(height, width, rng)
        pairs = []
        for d in args.shifts:  # d pixels along a fixed direction (0.6, 0.8)
            shift = np.float32([[1, 0, 0.8 * d], [0, 1, 0.6 * d]])
            moved = cv2.warpAffine(source, shift, source.shape[::-1], flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)  # fmt: skip
            crop = (slice(20, 20 + height), slice(20, 20 + width))
            pairs.append((source[crop].astype(np.uint8), moved[crop].astype(np.uint8)))
        times = {}
        rows = {}
        for name, estimate in methods.items():
            start = time.perf_counter()
            means = [float(np.hypot(*estimate(a, b).transpose(2, 0, 1)).mean()) for a, b in pairs]
            times[name] = time.perf_counter() - start
            rows[name] = [m if d == 0 else m / d for m, d in zip(means, args.shifts)]
        for name, values in rows.items():
            cells = " | ".join(f"{v:.2f}" for v in values)
            ratio = times[name] / times["DIS medium"]
            print(f"| {height}x{width} | {name} | {cells} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
