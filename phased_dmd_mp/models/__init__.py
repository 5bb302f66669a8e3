"""megatron-core DiTs with the architectures of diffusers' Wan2.x and Qwen-Image transformers."""

from phased_dmd_mp.models.config import ExecutionConfig, QwenImageConfig, WanConfig
from phased_dmd_mp.models.loading import (
    build,
    from_diffusers,
    load_checkpoint,
    load_whole_state_dict,
    save_checkpoint,
)

__all__ = [
    "ExecutionConfig",
    "QwenImageConfig",
    "WanConfig",
    "build",
    "from_diffusers",
    "load_checkpoint",
    "load_whole_state_dict",
    "save_checkpoint",
]
