"""nanoseek: the DeepSeek recipe (MLA, DeepSeekMoE, MTP, GRPO) in compact, readable PyTorch."""

from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "generate"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "generate":  # imported lazily: the sampling loop is not needed to build a model
        from nanoseek.generate import generate

        return generate
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
