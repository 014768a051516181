"""Tokenizers, all Hugging Face ``tokenizers`` models saved as ``tokenizer.json`` next to a checkpoint.

- ``Tokenizer.char()``: one token per printable ASCII character, for the built-in tasks (96 + 4 specials);
- ``Tokenizer.train_bpe(files, vocab_size)``: a byte-level BPE for real text.

Either loads with ``transformers.AutoTokenizer.from_pretrained(dir)`` as well (tokenizer_config.json is
written beside it), so TRL and transformers can use the same files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.chat import DEFAULT_CHAT_TEMPLATE

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


class Tokenizer:
    chat_template: str = DEFAULT_CHAT_TEMPLATE  # Jinja, saved in tokenizer_config.json (see nanoseek.chat)

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        missing = [s for s in SPECIALS if tok.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special token(s) {missing}; nanoseek needs {SPECIALS}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (tok.token_to_id(s) for s in SPECIALS)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ builders
    @classmethod
    def char(cls) -> Tokenizer:
        vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
        tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character alone
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(SPECIALS)
        return cls(tok)

    @classmethod
    def train_bpe(cls, files: list[str | Path], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Byte-level BPE (GPT-2 style) trained on local text files; nothing is downloaded."""
        for f in files:
            p = Path(f)
            if not p.is_file() or p.stat().st_size == 0:
                raise ValueError(f"tokenizer training file {p} is missing or empty")
        tok = HFTokenizer(models.BPE(unk_token=None))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train([str(f) for f in files], trainer)
        return cls(tok)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "bos_token": BOS, "eos_token": EOS,
            "unk_token": UNK, "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False,
        }
        config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: save one with Tokenizer.save or `nanoseek tokenizer train`")
        tokenizer = cls(HFTokenizer.from_file(str(path)))
        tokenizer.chat_template = saved_chat_template(directory)
        return tokenizer


def saved_chat_template(directory: str | Path) -> str:
    """The chat template saved in ``directory``'s tokenizer_config.json; the default for checkpoints saved before
    nanoseek had templates."""
    path = Path(directory) / "tokenizer_config.json"
    template = json.loads(path.read_text()).get("chat_template") if path.is_file() else None
    return template if isinstance(template, str) else DEFAULT_CHAT_TEMPLATE


class TransformersTokenizer:
    """A transformers tokenizer behind nanoseek's ``Tokenizer`` interface (encode/decode, pad/bos/eos ids, save)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError("the checkpoint's tokenizer has neither a pad nor an eos token; GRPO needs one")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(directory)


def load_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer: nanoseek's when it has nanoseek's special tokens, else transformers'."""
    if not (Path(directory) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--model {directory}: no tokenizer.json next to the checkpoint")
    try:
        return Tokenizer.load(directory)
    except ValueError:  # not nanoseek's special tokens: any Hugging Face tokenizer
        from transformers import AutoTokenizer

        return TransformersTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))


# ---------------------------------------------------------------------- input checks
def unknown_characters(tok: Tokenizer, text: str) -> list[tuple[int, str]]:
    """(offset, text) of every piece of ``text`` the tokenizer maps to ``<unk>`` (a byte-level BPE has none)."""
    enc = tok.tok.encode(text, add_special_tokens=False)
    return [(start, text[start:end]) for i, (start, end) in zip(enc.ids, enc.offsets) if i == tok.unk_id]


def _show(chars: list[str]) -> str:
    distinct = sorted(set(chars))
    shown = ", ".join(f"{c!r} (U+{ord(c[0]):04X})" for c in distinct[:10])
    return shown + (f" and {len(distinct) - 10} more" if len(distinct) > 10 else "")


def encode_checked(tok: Tokenizer, text: str, where: str, *, add_bos: bool = False, add_eos: bool = False,
                   allow_unknown: bool = False, max_tokens: int | None = None, is_file: bool = False) -> list[int]:
    """``tok.encode`` that refuses what would silently change the input: text that is not valid Unicode,
    characters the tokenizer lacks (unless ``allow_unknown``; the error lists them and names ``where``: a prompt,
    a file:line, or with ``is_file`` a file whose line it adds), and more than ``max_tokens`` tokens (a prompt
    over the model's context, ``max_position_embeddings``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: invalid Unicode (unpaired surrogate {text[e.start]!r} at character {e.start})"
                         ) from None
    if not allow_unknown and (unknown := unknown_characters(tok, text)):
        line = text.count("\n", 0, unknown[0][0]) + 1
        at = f"{where}:{line}" if is_file else f"{where} (line {line} of its text)" if "\n" in text else where
        raise ValueError(f"{at}: {len(unknown)} character(s) outside the tokenizer's vocabulary (the first here): "
                         f"{_show([c for _, c in unknown])}; they would become {UNK}: remove them, use a tokenizer "
                         "that has them (`nanoseek tokenizer train`), or pass --allow-unknown-chars")
    ids = tok.encode(text, add_bos=add_bos, add_eos=add_eos)
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(f"{where}: {len(ids)} tokens, more than the model's context of {max_tokens} "
                         "(max_position_embeddings); shorten it")
    return ids
