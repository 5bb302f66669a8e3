"""megatron-core DiTs with the architectures of diffusers' Wan2.x and Qwen-Image transformers."""

from phased_dmd_mp.models.config import ExecutionConfig, QwenImageConfig, WanConfig

# loading.py imports convert.py, so importing them here would load convert.py before
# `python -m phased_dmd_mp.models.convert` runs it as __main__ (runpy then warns of
# "unpredictable behaviour" on every call): they load on first use instead (PEP 562).
_LOADING = ("build", "from_diffusers", "load_checkpoint", "load_whole_state_dict", "save_checkpoint")


def __getattr__(name: str):
    if name in _LOADING:
        from phased_dmd_mp.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExecutionConfig", "QwenImageConfig", "WanConfig", *_LOADING]
