"""Special-token strings in text are text, never control tokens (as transformers' ``split_special_tokens=True``),
on every path that encodes text; only a rendered chat template's specials are parsed. BOS follows tokenizer.json's
post-processor, as transformers applies it: nanoseek's ids equal ``AutoTokenizer(dir)``'s."""

import importlib
import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.corpus import PrepareConfig, prepare
from nanoseek.data import IGNORE, pad_rows, sft_rows
from nanoseek.datasets import Row
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import SPECIALS, Tokenizer, encode_checked

transformers = pytest.importorskip("transformers")

TEXT = "a <eos> b<bos><pad> \\g<unk> c"  # every special of nanoseek's tokenizers, as text (test_re.py has \g<unk>)


def saved(tmp_path, kind: str) -> Tokenizer:
    """A char or BPE tokenizer saved to ``tmp_path / kind`` and loaded back."""
    tok = Tokenizer.char() if kind == "char" else Tokenizer.train_bpe([TEXT * 20, "hello world " * 50], 300)
    tok.save(tmp_path / kind)
    return Tokenizer.load(tmp_path / kind)


def word_level_dir(tmp_path, bos_by_post_processor: bool):
    """A word-level tokenizer with Llama's special tokens, BOS added by its post-processor or not at all."""
    words = ["<unk>", "<s>", "</s>", "hi", "there", "</", "s", ">"]
    raw = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(words[:3])
    if bos_by_post_processor:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory = tmp_path / f"words-{bos_by_post_processor}"
    directory.mkdir()
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_token_strings_in_text_are_text(tmp_path, kind):
    tok = saved(tmp_path, kind)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / kind)
    specials = {tok.tok.token_to_id(s) for s in SPECIALS}
    ids = tok.encode(TEXT)
    assert not specials & set(ids) and tok.decode(ids) == TEXT
    assert tok.encode(TEXT, add_bos=True, add_eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert tok.encode(TEXT, add_bos=True) == hf(TEXT, split_special_tokens=True)["input_ids"]
    assert tok.encode_prompt(TEXT) == tok.encode(TEXT, add_bos=True)  # RL prompts, `serve` completions
    # a literal <bos> first is text too: BOS is still added
    assert tok.encode("<bos>x", add_bos=True) == [tok.bos_id, *tok.encode("<bos>x")]
    # only what the caller marks as holding specials parses them (a rendered chat template)
    assert tok.encode("x<eos>", parse_specials=True) == [*tok.encode("x"), tok.eos_id]
    assert tok.encode("x<eos>", parse_specials=True) == hf("x<eos>", add_special_tokens=False)["input_ids"]


def test_chat_template_output_parses_specials_as_transformers(tmp_path):
    tok = saved(tmp_path, "char")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "char")
    convo = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "and 2+4?"}]
    ids = hf.apply_chat_template(convo, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.encode_prompt(convo) == [tok.bos_id, *ids] and ids.count(tok.eos_id) == 1  # the assistant turn's
    assert tok.encode_prompt("2+3?", system_prompt="Add.") == \
        tok.encode("System: Add.\n\nUser: 2+3?\nAssistant: ", add_bos=True)


def test_encode_checked_refuses_only_real_unknown_characters():
    tok = Tokenizer.char()
    assert encode_checked(tok, TEXT, "--prompt 1", add_bos=True) == tok.encode(TEXT, add_bos=True)
    assert tok.unk_id not in encode_checked(tok, "\\g<unk>", "p")
    with pytest.raises(ValueError, match=r"--prompt 1: 1 character\(s\) outside .*'é'"):
        encode_checked(tok, "<unk>é", "--prompt 1")
    # a rendered template's <unk> is the unk token asked for, not an unknown character
    assert encode_checked(tok, "a<unk>", "p", parse_specials=True) == [*tok.encode("a"), tok.unk_id]


def test_sft_rows_plain_text_keeps_specials_as_text_and_the_template_its_eos():
    tok = Tokenizer.char()
    (plain, n), = sft_rows(tok, [Row("say <eos> ", "<eos><pad>")], 64)
    assert plain == tok.encode("say <eos> ", add_bos=True) + tok.encode("<eos><pad>") + [tok.eos_id]
    assert plain.count(tok.eos_id) == 1 and tok.decode(plain[n:]) == "<eos><pad>"
    (chat, n), = sft_rows(tok, [Row([{"role": "user", "content": "hi"}], "yo")], 64)
    assert chat[-1] == tok.eos_id and chat.count(tok.eos_id) == 1
    assert pad_rows([(chat, n)], tok.pad_id).targets[0].tolist()[-3:] == [*tok.encode("yo"), tok.eos_id]
    assert pad_rows([(chat, n)], tok.pad_id).targets[0].tolist()[: n - 1] == [IGNORE] * (n - 1)


def test_prepared_shards_keep_special_token_strings_as_text(tmp_path):
    (tmp_path / "doc.txt").write_text(f"{TEXT}\n")
    prepare(PrepareConfig(data=[str(tmp_path / "doc.txt")], out=str(tmp_path / "shards"), val_per_mille=0,
                          workers=1), Tokenizer.char())
    tok = Tokenizer.load(tmp_path / "shards")
    bos, *ids, eos = np.fromfile(tmp_path / "shards" / "train.bin", dtype=np.uint16).tolist()
    assert (bos, eos) == (tok.bos_id, tok.eos_id) and tok.decode(ids) == f"{TEXT}\n"
    assert not {tok.tok.token_to_id(s) for s in SPECIALS} & set(ids)


def test_generate_cli_prompt_with_special_token_strings(tmp_path, capsys, monkeypatch):
    tok = Tokenizer.char()
    Transformer(ModelConfig(vocab_size=tok.vocab_size, max_position_embeddings=64)).save_pretrained(tmp_path)
    tok.save(tmp_path)
    seen = []
    module = importlib.import_module("nanoseek.generate")  # the package's `generate` is the function
    real = module.run_engine
    monkeypatch.setattr(module, "run_engine", lambda model, prompts, *a: seen.extend(prompts) or
                        real(model, prompts, *a))
    assert main(["generate", "--model", str(tmp_path), "--prompt", TEXT, "--max-completion-length", "2"]) == 0
    assert seen == [tok.encode(TEXT, add_bos=True)]


@pytest.mark.parametrize("case", ["char", "bpe", "no BOS", "BOS by post-processor"])
def test_bos_follows_the_rule_transformers_applies(tmp_path, case):
    if case in ("char", "bpe"):
        directory, text = tmp_path / case, TEXT
        saved(tmp_path, case)
    else:
        directory, text = word_level_dir(tmp_path, case != "no BOS"), "hi there </s>"
    tok, hf = Tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert tok.encode_prompt(text) == hf(text, split_special_tokens=True)["input_ids"]
    assert (tok.bos_id is None) == (case == "no BOS")


def test_tokenizer_saved_without_the_bos_rule_keeps_its_ids(tmp_path):
    """nanoseek's tokenizers saved before the rule was in tokenizer.json (no post-processor) still get BOS."""
    Tokenizer.char().save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    old = Tokenizer.load(tmp_path)
    assert old.tok.post_processor is None and old.encode("ab", add_bos=True) == [1, *Tokenizer.char().encode("ab")]


@pytest.mark.slow
def test_serve_prompt_with_special_token_strings(tmp_path):
    """`serve`: a completion prompt's special-token strings are text; a chat's rendered template parses its own."""
    import httpx
    from serve_fixture import start_server, stop_server

    server = start_server(tmp_path)
    try:
        tok, hf = server.tokenizer, transformers.AutoTokenizer.from_pretrained(server.directory)
        body = {"model": server.name, "prompt": TEXT, "max_tokens": 1}
        usage = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["usage"]
        assert usage["prompt_tokens"] == len(hf(TEXT, split_special_tokens=True)["input_ids"]) > 20
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "<pad>"}]
        body = {"model": server.name, "messages": messages, "max_tokens": 1}
        usage = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()["usage"]
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert usage["prompt_tokens"] == len([tok.bos_id, *ids]) and tok.eos_id in ids  # the assistant turn's EOS
    finally:
        assert stop_server(server) == 0
