"""What a distillation run's checkpoint holds and how a runner resumes from it (run mechanics;
the files, manifest and atomicity are checkpoint.py's).

The model state (written once per model-parallel rank): each generator expert's trained tensors
(none for a full-copy expert still standing in as its teacher), each live fake model's weights,
per trained role (`"fake/k"`, `"generator/k"`, `"real_critic/k"`) optim.py's layout-free state
(whole fp32 main params, Adam moments, EMA, step count), the fp32 EMA (or, without one, the fp32
main params) of finished experts, the levers' real-data critics and discriminator heads with
their optimizer (levers.py), progress and config. The rank state: this data-parallel rank's
random generator, condition sampler and real-latent sampler.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from phased_dmd_mp.distill import checkpoint
from phased_dmd_mp.distill.models import RoutedVelocity


def _module_state(model) -> dict:
    if isinstance(model, RoutedVelocity):
        return {"high": model.high.module.state_dict(), "low": model.low.module.state_dict()}
    return model.module.state_dict()


def model_state(d) -> dict:
    """The runner `d`'s model state (collective: sharded optimizer state is gathered)."""
    return {
        "generator": [[p.detach() for p in expert.parameters()] for expert in d.generator],
        "fakes": {k: _module_state(fake) for k, fake in d.fakes.items()},
        "optimizers": {f"{role}/{k}": t.state_dict() for (role, k), t in d.trained.items()},
        "ema": d.finished_ema,
        "finished_main": d.finished_main,
        "levers": d.levers.state_dict(),
        "progress": asdict(d.state),
        "config": asdict(d.config),
    }


def save(d) -> Path:
    """Checkpoint the runner `d` at its iteration (collective); refuses non-finite weights."""
    models = [*d.generator, *d.fakes.values(), *d.levers.critics.values()]
    trainable = [p for m in models for p in m.parameters()]
    if not all(bool(torch.isfinite(p).all()) for p in trainable):
        raise RuntimeError(
            f"non-finite weights at iteration {d.state.iteration}: not checkpointing "
            "them; lower the learning rates or resume from the last checkpoint"
        )
    rank_state = {
        "rng": d.rng.get_state(),
        "sampler": d.sampler.state_dict(),
        "levers": d.levers.rank_state(),
    }
    return checkpoint.save(
        d.run_dir, d.state.iteration, model_state(d), rank_state, d.config.keep_last,
        asdict(d.config),
    )  # fmt: skip


def restore(d, path: Path) -> None:
    """Restore the runner `d` from the checkpoint directory `path` (collective: the trained
    roles are rebuilt in their saved order on every rank)."""
    checkpoint.check_layout(path)
    state, rank_state = checkpoint.load(path)
    with torch.no_grad():
        for k, tensors in enumerate(state["generator"], start=1):
            expert = d._expert(k) if tensors else d.generator[k - 1]
            for p, value in zip(expert.parameters(), tensors, strict=True):
                p.copy_(value)
        for k, weights in state["fakes"].items():
            fake = d._fake(k)
            if isinstance(fake, RoutedVelocity):
                fake.high.module.load_state_dict(weights["high"])
                fake.low.module.load_state_dict(weights["low"])
            else:
                fake.module.load_state_dict(weights)
    d.levers.load_state_dict(state["levers"])
    for key, trained_state in state["optimizers"].items():
        role, k = key.split("/")
        d._trained(role, int(k)).load_state_dict(trained_state)
    d.finished_ema = state["ema"]
    d.finished_main = state.get("finished_main", {})  # absent before the export kept them
    d.state = type(d.state)(**state["progress"])
    d.rng.set_state(rank_state["rng"])
    d.sampler.load_state_dict(rank_state["sampler"])
    d.levers.load_rank_state(rank_state["levers"])
