"""FP8 linear layers: placeholder, filled in below."""

from __future__ import annotations

from phased_dmd_mp.models.layers import LinearSubmodules, default_core_attention


def layer_submodules(fp8: str) -> LinearSubmodules:
    return LinearSubmodules(core_attention=default_core_attention())
