"""Phased DMD on megatron-core: few-step MoE distillation of flow transformers."""

import warnings

# megatron-core warns on import that the optional Transformer Engine / Apex fast paths are
# absent; we never use Apex and import TE ourselves where it matters (parallel/fp8.py).
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")
warnings.filterwarnings("ignore", message=r"Apex is not installed")

__version__ = "0.1.0"
