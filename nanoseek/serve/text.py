"""The served model's tokenizer: ``tokenizer.json`` (any Hugging Face fast tokenizer: nanoseek's own, DeepSeek's),
its special tokens from ``tokenizer_config.json``, and the chat template (``nanoseek.chat``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class TextCodec:
    """encode/decode text for one checkpoint directory; ``render_chat`` for OpenAI ``messages``."""

    def __init__(self, directory: str | Path, eos_token_id: int | None = None):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: `nanoseek serve` needs the checkpoint's tokenizer "
                                    "(save one with Tokenizer.save or `nanoseek tokenizer train`)")
        self.tok = HFTokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token = _token(config.get("bos_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        if config.get("add_bos_token") is False:
            self.bos_id = None
        eos = _token(config.get("eos_token"))
        self.eos_id = self.tok.token_to_id(eos) if eos else eos_token_id
        self.directory = directory
        self._template = None

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt: BOS first (when the tokenizer has one and the text does not already start with it)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.bos_id is not None and not (self.bos_token and text.startswith(self.bos_token)):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as prompt text with the generation prompt, by the checkpoint's chat template."""
        from nanoseek.chat import chat_template

        if self._template is None:
            self._template = chat_template(self.directory)
        return self._template.render(messages, add_generation_prompt=True)
