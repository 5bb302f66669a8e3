"""The paper's 1D toy (Fig. 2, appendix D): is the subinterval objective right?

x_0 is uniform on a few atoms ({-1, 0, 1, 2}); small MLPs conditioned on t learn the flow-matching
velocity three ways:
  full_interval        t in (0, 1) from clean x_0 (Eq. 4): the reference;
  subinterval_correct  t in (s, 1) from x_s ~ p(x_s) only, clamped Eq. 13 (losses.py);
  subinterval_naive    t in (s, 1) from x_s only, with the biased target eps - x_s (Fig. 2c).
Each model's probability-flow ODE is integrated from the same noise x_1; on (s, 1) a correct
subinterval model must follow the full-interval model's trajectories, the naive one drifts.
Because x_0 is discrete the exact velocity E[eps - x_0 | x_t] is known in closed form, so every
model is also measured against the exact ODE.

    python -m phased_dmd_mp.toy --out runs/toy [--config configs/toy.yaml] [--set key=value ...]

writes DIR/metrics.json, DIR/trajectories.png (the paper's three panels) and DIR/config.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from phased_dmd_mp.config import ConfigError, add_config_arguments, load_config
from phased_dmd_mp.losses import DEFAULT_MAX_WEIGHT, flow_matching_loss, subinterval_flow_loss
from phased_dmd_mp.schedule import FLOW_MATCHING, sample_timesteps

OBJECTIVES = ("full_interval", "subinterval_correct", "subinterval_naive")
SUBINTERVAL_OBJECTIVES = OBJECTIVES[1:]


@dataclass(frozen=True)
class ToyConfig:
    atoms: tuple[float, ...] = (-1.0, 0.0, 1.0, 2.0)  # x_0 is uniform on these values
    subinterval_start: float = 0.5  # s: subinterval models train on (s, 1)
    width: int = 128  # hidden width of each MLP
    depth: int = 6  # linear layers per MLP
    train_steps: int = 2000  # optimizer steps of each model
    batch_size: int = 2048  # samples per step
    lr: float = 3e-3  # peak of a one-cycle schedule (5% warm-up, cosine decay)
    max_weight: float = DEFAULT_MAX_WEIGHT  # clamp of 1 / sigma_{t|s}^2 in Eq. 13
    eval_trajectories: int = 4096  # trajectories the metrics average over
    plot_trajectories: int = 200  # of which the figure draws the first (the paper draws 200)
    ode_steps: int = 200  # Euler steps over (0, 1)
    seed: int = 0  # of the weights, training draws and the trajectories' noise

    def __post_init__(self):
        if len(self.atoms) < 2:
            raise ValueError("atoms needs at least two values")
        if not 0.0 < self.subinterval_start < 1.0:
            raise ValueError(f"subinterval_start must be in (0, 1), got {self.subinterval_start}")
        for name in ("width", "depth", "train_steps", "batch_size", "eval_trajectories"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2 (input and output layers), got {self.depth}")
        if not 1 <= self.plot_trajectories <= self.eval_trajectories:
            raise ValueError("plot_trajectories must be in 1..eval_trajectories")
        if self.ode_steps < 2:
            raise ValueError(f"ode_steps must be >= 2, got {self.ode_steps}")
        if not self.lr > 0 or not self.max_weight > 0:
            raise ValueError("lr and max_weight must be > 0")


class TimeConditionedMLP(nn.Module):
    """psi(x_t, t): an MLP on [x_t, t, Fourier features of t]."""

    def __init__(self, width: int, depth: int, num_frequencies: int = 8):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies))
        layers: list[nn.Module] = []
        in_features = 2 + 2 * num_frequencies
        for _ in range(depth - 1):
            layers += [nn.Linear(in_features, width), nn.SiLU()]
            in_features = width
        layers.append(nn.Linear(in_features, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angles = t[:, None] * self.frequencies
        return self.net(torch.cat([x, t[:, None], angles.sin(), angles.cos()], dim=1))


def exact_velocity(x: Tensor, t: Tensor, atoms: Tensor) -> Tensor:
    """E[eps - x_0 | x_t = x] for x_0 uniform on `atoms` (x: (n, 1), t: (n,), 0 < t <= 1)."""
    alpha, sigma = (c.to(x.dtype)[:, None] for c in FLOW_MATCHING.coefficients(t))
    posterior = torch.softmax(-((x - alpha * atoms) ** 2) / (2 * sigma**2), dim=1)
    x0_mean = (posterior * atoms).sum(dim=1, keepdim=True)
    eps_mean = (x - alpha * x0_mean) / sigma
    return eps_mean - x0_mean


def _draw_x0(atoms: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return atoms[torch.randint(len(atoms), (n,), generator=generator)][:, None]


def training_loss(
    objective: str, model: nn.Module, config: ToyConfig, atoms: Tensor, generator: torch.Generator
) -> Tensor:
    n = config.batch_size
    x0 = _draw_x0(atoms, n, generator)
    eps = torch.randn(n, 1, generator=generator)
    if objective == "full_interval":
        t = torch.rand(n, generator=generator)
        return flow_matching_loss(model(FLOW_MATCHING.add_noise(x0, eps, t), t), x0, eps)
    # Subinterval objectives see only x_s ~ p(x_s), never the x_0 behind it.
    s = torch.full((n,), config.subinterval_start)
    x_s = FLOW_MATCHING.add_noise(x0, torch.randn(n, 1, generator=generator), s)
    t = sample_timesteps(n, config.subinterval_start, 1.0, shift=1.0, generator=generator)
    v = model(FLOW_MATCHING.add_noise_from(x_s, eps, t, s), t)
    if objective == "subinterval_correct":
        return subinterval_flow_loss(v, x_s, eps, t, s, max_weight=config.max_weight)
    if objective == "subinterval_naive":
        return (v - (eps - x_s)).square().mean()
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def train(objective: str, config: ToyConfig, progress: bool = True) -> tuple[nn.Module, dict]:
    # Same seed for every objective: identical initial weights and data stream.
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    atoms = torch.tensor(config.atoms)
    model = TimeConditionedMLP(config.width, config.depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.train_steps, pct_start=0.05
    )
    start, recent = time.perf_counter(), []
    bar = tqdm(
        range(config.train_steps), desc=f"train {objective}", disable=not progress, mininterval=0.5
    )
    for step in bar:
        loss = training_loss(objective, model, config, atoms, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-100:]
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    model.eval()
    stats = {"seconds": time.perf_counter() - start, "final_loss": sum(recent) / len(recent)}
    return model, stats


def time_grid(config: ToyConfig) -> Tensor:
    """1 -> 0 with s on the grid, so trajectories can be cut exactly at s."""
    s = config.subinterval_start
    upper = max(1, round(config.ode_steps * (1.0 - s)))
    lower = max(1, config.ode_steps - upper)
    return torch.cat(
        [
            torch.linspace(1.0, s, upper + 1, dtype=torch.float64),
            torch.linspace(s, 0.0, lower + 1, dtype=torch.float64)[1:],
        ]
    )


@torch.no_grad()
def integrate(velocity, x1: Tensor, times: Tensor) -> Tensor:
    """Probability-flow ODE from x_1 along `times` (decreasing); returns (n, len(times))."""
    x, path = x1, [x1]
    for t, t_next in itertools.pairwise(times):
        t_batch = torch.full((x.shape[0],), float(t))
        x = FLOW_MATCHING.denoise_step(
            x, velocity(x, t_batch), t, t_next
        )  # Euler for flow matching
        path.append(x)
    return torch.cat(path, dim=1)


def _deviation(paths: Tensor, reference: Tensor) -> dict:
    return {
        "mean_abs": float((paths - reference).abs().mean()),
        "endpoint_rmse": float((paths[:, -1] - reference[:, -1]).square().mean().sqrt()),
    }


def run(config: ToyConfig, out_dir: Path, progress: bool = True) -> dict:
    """Train the three models, integrate their ODEs, write metrics.json and trajectories.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    )
    atoms = torch.tensor(config.atoms)
    times = time_grid(config)
    cut = int((times >= config.subinterval_start).sum())  # points on [s, 1]
    x1 = torch.randn(
        config.eval_trajectories, 1, generator=torch.Generator().manual_seed(config.seed + 1)
    )

    paths, train_stats = {}, {}
    for objective in OBJECTIVES:
        model, train_stats[objective] = train(objective, config, progress)
        end = len(times) if objective == "full_interval" else cut
        paths[objective] = integrate(model, x1, times[:end])
    exact = integrate(lambda x, t: exact_velocity(x, t, atoms), x1, times)

    full_on_interval = paths["full_interval"][:, :cut]
    from_full = {name: _deviation(paths[name], full_on_interval) for name in SUBINTERVAL_OBJECTIVES}
    from_exact = {name: _deviation(path, exact[:, : path.shape[1]]) for name, path in paths.items()}
    from_exact["full_interval_on_subinterval"] = _deviation(full_on_interval, exact[:, :cut])
    metrics = {
        "subinterval": [config.subinterval_start, 1.0],
        "trajectories": config.eval_trajectories,
        "deviation_from_full_interval": from_full,
        "deviation_from_exact_ode": from_exact,
        "naive_over_correct_deviation": from_full["subinterval_naive"]["mean_abs"]
        / from_full["subinterval_correct"]["mean_abs"],
        "training": train_stats,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_trajectories(paths, times, atoms, config, metrics, out_dir / "trajectories.png")
    return metrics


def plot_trajectories(paths, times, atoms, config, metrics, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = config.plot_trajectories
    t = times.numpy()
    full = paths["full_interval"][:n].numpy()
    # Colour each trajectory by the atom its full-interval twin ends at.
    mode = (paths["full_interval"][:n, -1:] - atoms).abs().argmin(dim=1).numpy()
    colors = plt.get_cmap("tab10")(mode % 10)
    deviation = metrics["deviation_from_full_interval"]
    titles = {
        "full_interval": "(a) full interval, Eq. 4",
        "subinterval_correct": "(b) subinterval, Eq. 13 (dashed: (a))\n"
        f"mean |dev| from (a) = {deviation['subinterval_correct']['mean_abs']:.4f}",
        "subinterval_naive": "(c) subinterval, target eps - x_s (dashed: (a))\n"
        f"mean |dev| from (a) = {deviation['subinterval_naive']['mean_abs']:.4f}",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, name in zip(axes, OBJECTIVES):
        lines = paths[name][:n].numpy()
        cut = lines.shape[1]
        for i in range(n):
            ax.plot(t[:cut], lines[i], color=colors[i], lw=0.6, alpha=0.8, zorder=2)
        if name != "full_interval":
            # (a)'s trajectories from the same noise: dashed on top where this model was trained,
            # grey beyond it, where it was not.
            ax.plot(
                t[:cut], full[:, :cut].T, color="black", lw=0.4, ls=(0, (2, 2)), alpha=0.6, zorder=3
            )
            ax.plot(t[cut - 1 :], full[:, cut - 1 :].T, color="0.85", lw=0.5, zorder=1)
            ax.axvspan(0.0, config.subinterval_start, color="0.96", zorder=0)
            ax.text(
                config.subinterval_start / 2,
                0.02,
                "not trained here:\n(a) continued, grey",
                transform=ax.get_xaxis_transform(),
                ha="center",
                fontsize=8,
                color="0.4",
            )
        ax.set_xlim(1.0, 0.0)
        ax.set_xlabel("t (sampling runs 1 -> 0)")
        ax.set_title(titles[name], fontsize=10)
    axes[0].set_ylabel("x_t")
    fig.suptitle(
        f"1D toy, x_0 in {list(config.atoms)}, {n} trajectories from shared noise", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.toy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    add_config_arguments(parser, ToyConfig, "train_steps=500")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = parser.parse_args(argv)
    try:
        config = load_config(ToyConfig, args.config, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    if (args.out / "metrics.json").exists() and not args.overwrite:
        parser.error(f"{args.out} already holds results; pass --overwrite or choose another --out")
    metrics = run(config, args.out)
    deviation = metrics["deviation_from_full_interval"]
    print(
        f"trajectory deviation from the full-interval model on {tuple(metrics['subinterval'])}: "
        f"correct {deviation['subinterval_correct']['mean_abs']:.4f}, "
        f"naive {deviation['subinterval_naive']['mean_abs']:.4f} "
        f"({metrics['naive_over_correct_deviation']:.1f}x)\n"
        f"wrote {args.out / 'metrics.json'} and {args.out / 'trajectories.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
