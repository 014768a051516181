"""nanoseek: the DeepSeek recipe (MLA, DeepSeekMoE, MTP, GRPO) in compact, readable PyTorch."""

from nanoseek.config import ModelConfig

# imported eagerly: a lazy attribute would be replaced by the submodule once `nanoseek.generate` is imported
from nanoseek.generate import generate
from nanoseek.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "generate"]
__version__ = "0.1.0"
