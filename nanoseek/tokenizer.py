"""The text codec of the engine, the server and the trainers: a Hugging Face fast tokenizer (``tokenizer.json``),
its special tokens and BOS rule (``tokenizer_config.json``) and its chat template (``nanoseek.chat``): a
character-level one for the built-in tasks, a byte-level BPE trained on local text (``nanoseek prepare``), or any
checkpoint's. The saved files load with ``transformers.AutoTokenizer.from_pretrained(dir)`` too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Encoding, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, check_messages

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
NANOSEEK_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "bos_token": BOS, "eos_token": EOS,
                   "unk_token": UNK, "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
# transformers' SPECIAL_TOKENS_ATTRIBUTES: each one present is a template variable
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ENCODE_LOCK = threading.Lock()  # guards the backend's encode_special_tokens flag, set per call


class Tokenizer:
    """Text to token ids and back, prompts to ids with the chat template and BOS rule. ``config``: tokenizer_config.json
    (nanoseek's by default); ``pad_id`` (else EOS), ``bos_id``, ``eos_id``, ``unk_id`` are None when absent."""

    def __init__(self, tok: HFTokenizer, config: dict | None = None, chat_template: str | None = DEFAULT_CHAT_TEMPLATE):
        self.tok, self.chat_template = tok, chat_template
        self.config = dict(NANOSEEK_CONFIG if config is None else config)
        named = {k: v.get("content") if isinstance(v, dict) else v for k, v in self.config.items()}
        self.specials = {k: v for k, v in named.items() if k in SPECIAL_TOKEN_NAMES and v}
        missing = [t for t in self.specials.values() if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer.json lacks the special token(s) {missing} that tokenizer_config.json names")
        pad, bos, eos, unk = (tok.token_to_id(self.specials[k]) if k in self.specials else None
                              for k in ("pad_token", "bos_token", "eos_token", "unk_token"))
        if config is None and tok.post_processor is None:  # nanoseek's rule, where transformers reads it too
            tok.post_processor = processors.TemplateProcessing(f"{BOS} $A", special_tokens=[(BOS, bos)])
        first = tok.encode("", add_special_tokens=True).ids[:1]  # BOS as tokenizer.json's post-processor adds it
        legacy = tok.post_processor is None and all(tok.token_to_id(s) is not None for s in SPECIALS)  # nanoseek 0.1.0
        self.bos_id = bos if (first == [bos] or legacy) and self.config.get("add_bos_token") is not False else None
        self.eos_id, self.unk_id, self.pad_id = eos, unk, pad if pad is not None else eos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def template(self) -> ChatTemplate:
        """The chat template, with the special tokens as its variables; a ValueError when the tokenizer has none."""
        if self.chat_template is None:
            raise ValueError("no chat template (chat_template.jinja or tokenizer_config.json's 'chat_template'): "
                             "messages and --system-prompt need a chat template; give plain strings or add one")
        return ChatTemplate(self.chat_template, tuple(self.specials.items()))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return () if self.eos_id is None else (self.eos_id,)

    def encoding(self, text: str, parse_specials: bool = False) -> Encoding:
        """``text`` encoded; its special-token strings are text unless ``parse_specials`` (a rendered chat template)."""
        with _ENCODE_LOCK:
            self.tok.encode_special_tokens = not parse_specials
            return self.tok.encode_batch([text], add_special_tokens=False)[0]  # the batch call releases the GIL

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, *, parse_specials: bool = False
               ) -> list[int]:
        """``text``'s ids; ``add_bos``: BOS first by the tokenizer's rule, never doubled (Llama templates write it)."""
        return self.with_ends(self.encoding(text, parse_specials).ids, add_bos, add_eos)

    def with_ends(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids + ([self.eos_id] if add_eos and self.eos_id is not None else [])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def prompt_text(self, prompt: str | list[dict], system_prompt: str | None = None) -> str:
        """The text a policy continues for one dataset prompt, as TRL does: a plain string as is; messages (and,
        given ``system_prompt``, a string as a user message) rendered with the chat template and generation prompt."""
        if isinstance(prompt, str) and system_prompt is None:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.template().render(messages, add_generation_prompt=True, system_prompt=system_prompt)

    def encode_prompt(self, prompt: str | list[dict], system_prompt: str | None = None) -> list[int]:
        text = self.prompt_text(prompt, system_prompt)
        return self.encode(text, add_bos=True, parse_specials=text is not prompt)  # rendered: parse its specials

    def sft_texts(self, prompt: str | list[dict], completion: str | list[dict],
                  system_prompt: str | None = None) -> tuple[str, str, bool]:
        """(prompt text, completion text, plain) of one SFT row: plain strings as they are (append EOS; specials are
        text); else the conversation rendered whole (parse its specials), cut after the generation prompt, as TRL."""
        if isinstance(prompt, str) and isinstance(completion, str) and system_prompt is None:
            return prompt, completion, True
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        template = self.template()
        head = template.render(messages, add_generation_prompt=True, system_prompt=system_prompt)
        full = template.render([*messages, *check_messages(reply, "completion")], add_generation_prompt=False,
                               system_prompt=system_prompt)
        if not full.startswith(head):
            raise ValueError("the chat template renders the prompt differently inside the whole conversation, so "
                             f"the completion cannot be cut off: {head[-60:]!r} vs {full[:len(head)][-60:]!r}")
        return head, full[len(head):], False

    @classmethod
    def char(cls) -> Tokenizer:
        vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
        tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character alone
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(SPECIALS)
        return cls(tok)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Byte-level BPE (GPT-2 style) trained on ``texts``; nothing is downloaded."""
        tok = HFTokenizer(models.BPE(unk_token=None))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                           special_tokens=SPECIALS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return cls(tok)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        config = {**self.config, "chat_template": self.chat_template} if self.chat_template else self.config
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """``directory``'s tokenizer.json, tokenizer_config.json and chat template (chat_template.jinja, else the
        config's; of named ones, ``default``); one with nanoseek's special tokens gets nanoseek's where absent."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory / 'tokenizer.json'} not found: make one with `nanoseek prepare` "
                                    "(it saves the tokenizer beside the shards) or Tokenizer.save")
        tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        jinja = directory / "chat_template.jinja"
        template = jinja.read_text() if jinja.is_file() else config.get("chat_template")
        if isinstance(template, list):  # [{"name", "template"}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        template = template if isinstance(template, str) else None
        if all(tok.token_to_id(s) is not None for s in SPECIALS):
            config, template = config or NANOSEEK_CONFIG, template or DEFAULT_CHAT_TEMPLATE
        return cls(tok, config, template)


# ---------------------------------------------------------------------- input checks
def encode_checked(tok: Tokenizer, text: str, where: str, *, add_bos: bool = False, add_eos: bool = False,
                   allow_unknown: bool = False, max_tokens: int | None = None, is_file: bool = False,
                   parse_specials: bool = False) -> list[int]:
    """``tok.encode`` that refuses invalid Unicode, characters the tokenizer lacks (unless ``allow_unknown``; listed,
    at ``where``, a file with ``is_file``) and over ``max_tokens`` tokens (the model's ``max_position_embeddings``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: invalid Unicode (unpaired surrogate {text[e.start]!r} at {e.start})") from None
    enc = tok.encoding(text, parse_specials)
    unknown = [(start, text[start:end]) for i, (start, end) in zip(enc.ids, enc.offsets)
               if i == tok.unk_id and text[start:end] != tok.specials.get("unk_token")]  # not a parsed <unk>
    if unknown and not allow_unknown:
        line = text.count("\n", 0, unknown[0][0]) + 1
        at = f"{where}:{line}" if is_file else f"{where} (line {line} of its text)" if "\n" in text else where
        distinct = sorted({c for _, c in unknown})
        shown = ", ".join(f"{c!r} (U+{ord(c[0]):04X})" for c in distinct[:10])
        more = f" and {len(distinct) - 10} more" if len(distinct) > 10 else ""
        raise ValueError(f"{at}: {len(unknown)} character(s) outside the tokenizer's vocabulary (the first here): "
                         f"{shown}{more}; they would become {UNK}: remove them, use a tokenizer that has them "
                         "(`nanoseek prepare` trains one), or pass --allow-unknown-chars")
    ids = tok.with_ends(enc.ids, add_bos, add_eos)  # the checked encoding, not a second one
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(f"{where}: {len(ids)} tokens, more than the model's context of {max_tokens} "
                         "(max_position_embeddings); shorten it")
    return ids
