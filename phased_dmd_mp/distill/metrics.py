"""What a distillation run reports about its training (run mechanics): the logged means of
each window of iterations (history, stdout, TensorBoard's train/ scalars: every loss and
gradient norm, the levers' own included), the checks that stop a run that diverged, and the
non-finite conditions a skipped update's message names."""

from __future__ import annotations

import torch.distributed as dist
from tqdm import tqdm

from phased_dmd_mp.data.readers import condition_tensors, nonfinite_items


def log_window(d, window: list[dict]) -> dict:
    """Means over `window` (the metrics of each iteration since the last log) appended to the
    runner `d`'s history, printed and written to TensorBoard (logging rank); returns them."""
    labels = ("phase", "shape")  # the last iteration's, not a mean
    keys = dict.fromkeys(key for m in window for key in m if key not in labels)  # in order
    means = {}
    for key in keys:  # a lever's loss may be logged in some phases only (diversity)
        values = [m[key] for m in window if key in m]
        means[key] = sum(values) / len(values)
    means.update({key: window[-1][key] for key in labels})
    means["iteration"] = d.state.iteration
    for role in ("generator", "fake"):
        means[f"{role}_skipped"] = d.state.skipped.get(role, 0)
    d.state.history.append(means)
    if d.is_logger:
        tqdm.write(log_line(means, d.latent_shapes))
        for key, value in means.items():
            if key not in ("iteration",):
                d.writer.add_scalar(f"train/{key}", value, d.state.iteration)
    return means


LEVER_LOSSES = ("diversity_loss", "real_critic_loss", "real_critic_fake_loss",
                "gan_generator_loss", "gan_discriminator_loss")


def log_line(means: dict, latent_shapes: list) -> str:
    """The stdout line of a logged window: DMD's losses, each lever's that ran in it (means),
    and, when the run trains at several `latent_shapes`, the shape of its last iteration."""
    shape = ""
    if len(latent_shapes) > 1:
        shape = " shape " + "x".join(str(n) for n in latent_shapes[means["shape"]])
    levers = "".join(f" {key} {means[key]:.4g}" for key in LEVER_LOSSES if key in means)
    return (
        f"iter {means['iteration']:>6} phase {means['phase']}{shape} "
        f"generator {means['generator_loss']:.4g} (|g| {means['generator_grad_norm']:.3g}) "
        f"fake {means['fake_loss']:.4g} (|g| {means['fake_grad_norm']:.3g}){levers} "
        f"{means['seconds']:.2f} s/it"
    )


def divergence(d) -> str | None:
    """Why the run must stop: max_consecutive_skips updates in a row were skipped."""
    for role, count in d.state.skips_in_a_row.items():
        if count >= d.config.max_consecutive_skips:
            return (
                f"the run diverged: {count} consecutive {role} updates skipped (non-finite "
                f"loss or gradient) by iteration {d.state.iteration}"
            )
    return None


def untrained_experts(d) -> str | None:
    """An expert none of whose generator updates was applied must not be exported."""
    untrained = [k for k in range(1, d.config.num_phases + 1) if not d.state.applied.get(k)]
    if not untrained:
        return None
    return (
        f"every generator update of expert(s) {untrained} was skipped (non-finite loss or "
        "gradient): not exporting an untrained generator"
    )


def nonfinite_conditions(r) -> dict[int, list[str]]:
    """{condition index: tensors with NaN/Inf} of every rank's batch of the rollout `r`, to name
    in the message of a skipped update (collective)."""
    bad = nonfinite_items({k: v.cpu() for k, v in condition_tensors(r.cond).items()})
    found = {int(r.indices[row]): names for row, names in bad.items()}
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, found)
        found = {k: v for rank in gathered for k, v in rank.items()}
    return found
