"""Two experts split at a timestep boundary (Wan2.2 A14B: high noise above, low noise below)."""

from __future__ import annotations

from torch import Tensor, nn


class TimestepRoutedExperts(nn.Module):
    """Sends each sample to `high` if its timestep >= `boundary`, else to `low`, as diffusers'
    Wan2.2 pipelines do per step (boundary = boundary_ratio * 1000: 875 for T2V, 900 for I2V).

    Both experts take the same arguments; every tensor argument is indexed on its batch dim.
    Per-token timesteps (TI2V) route on the largest timestep of the sample.
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, boundary

    def forward(self, hidden_states: Tensor, timestep: Tensor, **kwargs) -> Tensor:
        per_sample = timestep if timestep.ndim == 1 else timestep.amax(dim=1)
        is_high = per_sample >= self.boundary
        if is_high.all() or not is_high.any():
            expert = self.high if is_high.all() else self.low
            return expert(hidden_states, timestep, **kwargs)
        output = None
        for expert, rows in ((self.high, is_high), (self.low, ~is_high)):
            index = rows.nonzero().squeeze(1)
            part = expert(
                hidden_states[index],
                timestep[index],
                **{k: _select(v, index, len(rows)) for k, v in kwargs.items()},
            )
            if output is None:
                output = part.new_empty((len(rows), *part.shape[1:]))
            output[index] = part
        return output


def _select(value, index: Tensor, batch: int):
    if not isinstance(value, Tensor):
        return value
    if value.shape[0] == batch:
        return value[index]
    # FLF2V image tokens come as `frames` consecutive entries per sample.
    frames = value.shape[0] // batch
    return value.unflatten(0, (batch, frames))[index].flatten(0, 1)
