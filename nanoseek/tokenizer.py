"""The text codec of the engine, the server and the trainers: a Hugging Face fast tokenizer (``tokenizer.json``),
its special tokens and BOS rule (``tokenizer_config.json``) and its chat template (``nanoseek.chat``): a
character-level one for the built-in tasks, a byte-level BPE trained on local text (``nanoseek tokenizer train``), or
any checkpoint's. The saved files load with ``transformers.AutoTokenizer.from_pretrained(dir)`` too.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek import cli_args
from nanoseek.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, prompt_text, saved_config, special_tokens

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
NANOSEEK_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "bos_token": BOS, "eos_token": EOS,
                   "unk_token": UNK, "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}


class Tokenizer:
    """Text to token ids and back, prompts (plain text or messages) to ids with the chat template and the BOS rule,
    and the stop ids. ``config`` is tokenizer_config.json's contents (nanoseek's own by default): the special tokens
    (the ids ``pad_id`` (else EOS), ``bos_id``, ``eos_id``, ``unk_id``; None when absent) and ``add_bos_token``."""

    def __init__(self, tok: HFTokenizer, config: dict | None = None,
                 chat_template: str | None = DEFAULT_CHAT_TEMPLATE):
        self.tok, self.chat_template = tok, chat_template
        self.config = dict(NANOSEEK_CONFIG if config is None else config)
        self.specials = special_tokens(self.config)
        missing = [t for t in self.specials.values() if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer.json lacks the special token(s) {missing} that tokenizer_config.json names")
        pad, bos, eos, unk = (tok.token_to_id(self.specials[k]) if k in self.specials else None
                              for k in ("pad_token", "bos_token", "eos_token", "unk_token"))
        self.bos_id = None if self.config.get("add_bos_token") is False else bos
        self.eos_id, self.unk_id, self.pad_id = eos, unk, pad if pad is not None else eos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def template(self) -> ChatTemplate | None:
        return None if self.chat_template is None else ChatTemplate(self.chat_template, tuple(self.specials.items()))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a completion: EOS."""
        return () if self.eos_id is None else (self.eos_id,)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return bos + ids + ([self.eos_id] if add_eos and self.eos_id is not None else [])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def adds_bos(self, text: str) -> bool:
        """Whether a prompt's ids start with BOS: when the tokenizer has one, unless ``text`` already starts with the
        BOS token (Llama's chat templates write it), so BOS is never doubled."""
        return self.bos_id is not None and not text.startswith(self.specials["bos_token"])

    def encode_prompt(self, prompt: str | list[dict], system_prompt: str | None = None) -> list[int]:
        """A prompt's ids: a string as is, messages rendered with the chat template and the generation prompt
        (``nanoseek.chat.prompt_text``), then BOS (see ``adds_bos``)."""
        text = prompt_text(self.template, prompt, system_prompt)
        return self.encode(text, add_bos=self.adds_bos(text))

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
    def train_bpe(cls, files: list[str | Path] | Iterator[str], vocab_size: int = 4096, min_frequency: int = 2
                  ) -> Tokenizer:
        """Byte-level BPE (GPT-2 style) trained on local text files or an iterator of texts; nothing is downloaded."""
        for f in files if isinstance(files, list) else []:
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
        if isinstance(files, list):
            tok.train([str(f) for f in files], trainer)
        else:
            tok.train_from_iterator(files, trainer)
        return cls(tok)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        config = {**self.config, "chat_template": self.chat_template} if self.chat_template else self.config
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """``directory``'s tokenizer.json with tokenizer_config.json. A tokenizer with nanoseek's special tokens and
        no saved config or template gets nanoseek's (``DEFAULT_CHAT_TEMPLATE``)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: save one with Tokenizer.save or `nanoseek tokenizer train`")
        tok = HFTokenizer.from_file(str(path))
        config, template = saved_config(directory)
        if all(tok.token_to_id(s) is not None for s in SPECIALS):
            config, template = config or NANOSEEK_CONFIG, template or DEFAULT_CHAT_TEMPLATE
        return cls(tok, config, template)


load_tokenizer = Tokenizer.load  # the name the trainers and evaluators use


# ---------------------------------------------------------------------- input checks
def unknown_characters(tok: Tokenizer, text: str) -> list[tuple[int, str]]:
    """(offset, text) of every piece of ``text`` the tokenizer maps to ``<unk>`` (a byte-level BPE has none)."""
    enc = tok.tok.encode(text, add_special_tokens=False)
    return [(start, text[start:end]) for i, (start, end) in zip(enc.ids, enc.offsets) if i == tok.unk_id]


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
        distinct = sorted({c for _, c in unknown})
        shown = ", ".join(f"{c!r} (U+{ord(c[0]):04X})" for c in distinct[:10])
        more = f" and {len(distinct) - 10} more" if len(distinct) > 10 else ""
        raise ValueError(f"{at}: {len(unknown)} character(s) outside the tokenizer's vocabulary (the first here): "
                         f"{shown}{more}; they would become {UNK}: remove them, use a tokenizer that has them "
                         "(`nanoseek tokenizer train`), or pass --allow-unknown-chars")
    ids = tok.encode(text, add_bos=add_bos, add_eos=add_eos)
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(f"{where}: {len(ids)} tokens, more than the model's context of {max_tokens} "
                         "(max_position_embeddings); shorten it")
    return ids


# ---------------------------------------------------------------------- `nanoseek tokenizer`
@dataclass(frozen=True)
class TrainTokenizerConfig:
    files: list[str] = cli_args.option(help="plain text files", nargs="+")
    out: str = cli_args.option(help="directory for tokenizer.json")
    vocab_size: int = cli_args.option(4096, "tokens in the vocabulary (at least 256 bytes + 4 specials)")
    min_frequency: int = cli_args.option(2, "fewest occurrences of a pair to merge it", min=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    cli_args.add_arguments(sub.add_parser("train", help="train a byte-level BPE on local text files"),
                           TrainTokenizerConfig)


def run(args: argparse.Namespace) -> int:
    cfg = cli_args.from_args(TrainTokenizerConfig, args)
    if cfg.vocab_size < 260:
        raise ValueError(f"--vocab-size {cfg.vocab_size} is too small: byte-level BPE needs 256 bytes + 4 specials")
    cli_args.check_ranges(cfg)
    tok = Tokenizer.train_bpe(cfg.files, cfg.vocab_size, cfg.min_frequency)
    tok.save(cfg.out)
    print(f"{cfg.out}/tokenizer.json: {tok.vocab_size} tokens")
    return 0
