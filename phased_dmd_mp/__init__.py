"""Phased DMD on megatron-core: few-step MoE distillation of flow transformers."""

__version__ = "0.1.0"
