"""nanoseek: the DeepSeek recipe (MLA, DeepSeekMoE, MTP, GRPO) in compact, readable PyTorch."""

from nanoseek.config import ModelConfig
from nanoseek.generate import generate  # eager: a lazy attribute would be replaced by the submodule once imported
from nanoseek.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "generate"]
__version__ = "0.1.0"
