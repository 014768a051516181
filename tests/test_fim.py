import importlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek import cli
from nanoseek.config import ModelConfig
from nanoseek.evaluate import fim_exact_match
from nanoseek.fim import SENTINELS, encode_document, infill_prompt, sentinel_ids, val_documents
from nanoseek.generate import generate
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer

DOC = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


def fim_tokenizer() -> Tokenizer:
    tok = Tokenizer.char()
    tok.tok.add_special_tokens(list(SENTINELS))
    return tok


def split_at(ids: list[int], marks: tuple[int, ...]) -> list[list[int]]:
    pieces, current = [], []
    for i in ids:
        if i in marks:
            pieces.append(current)
            current = []
        else:
            current.append(i)
    return pieces + [current]


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_fim_formats_round_trip(mode: str) -> None:
    tok = fim_tokenizer()
    begin, hole, end = sentinel_ids(tok)
    middles = set()
    for seed in range(20):
        ids = encode_document(DOC, tok, random.Random(seed), 1.0, mode)
        replay = random.Random(seed)
        replay.random()
        start, stop = sorted(replay.randint(0, len(DOC)) for _ in range(2))
        first, second, third, after_end = split_at(ids, (begin, hole, end))
        assert first == []
        if mode == "psm":  # begin prefix hole suffix end middle
            prefix, suffix, middle = tok.decode(second), tok.decode(third), tok.decode(after_end)
        else:  # begin hole suffix end prefix middle
            assert second == []
            suffix, prefix_and_middle = tok.decode(third), tok.decode(after_end)
            prefix, middle = prefix_and_middle[:start], prefix_and_middle[start:]
        assert (prefix, middle, suffix) == (DOC[:start], DOC[start:stop], DOC[stop:])
        assert ids == infill_prompt(prefix, suffix, tok, mode) + tok.encode(middle)
        middles.add(middle)
    assert len(middles) > 5  # the split points vary with the rng


def test_rate_zero_is_plain_and_pieces_never_become_sentinels() -> None:
    tok = fim_tokenizer()
    assert encode_document(DOC, tok, random.Random(0), 0.0, "psm") == tok.encode(DOC)
    text = f"x = '{SENTINELS[1]}'\n"
    for seed in range(10):
        ids = encode_document(text, tok, random.Random(seed), 1.0, "psm")
        assert ids.count(sentinel_ids(tok)[1]) == 1


def test_missing_sentinels_and_bad_mode() -> None:
    with pytest.raises(ValueError, match="nanoseek prepare, which adds the FIM sentinels"):
        encode_document(DOC, Tokenizer.char(), random.Random(0), 1.0, "psm")
    with pytest.raises(ValueError, match="FIM mode"):
        infill_prompt("a", "b", fim_tokenizer(), "pms")


def test_infill_prompt_fits_the_budget() -> None:
    tok = fim_tokenizer()
    prefix, suffix = "a" * 50, "b" * 30
    begin, hole, end = sentinel_ids(tok)
    ids = infill_prompt(prefix, suffix, tok, "psm", max_tokens=23)
    assert len(ids) == 23 and ids[:1] == [begin] and ids[-1] == end
    assert tok.decode(ids[1:ids.index(hole)]) == "a" * 10 and tok.decode(ids[ids.index(hole) + 1:-1]) == "b" * 10
    ids = infill_prompt("a" * 5, suffix, tok, "spm", max_tokens=23)  # a short prefix leaves the rest to the suffix
    assert tok.decode(ids[2:ids.index(end)]) == "b" * 15 and tok.decode(ids[ids.index(end) + 1:]) == "a" * 5
    assert infill_prompt(prefix, suffix, tok, "psm", max_tokens=200) == infill_prompt(prefix, suffix, tok, "psm")


def fim_checkpoint(tmp_path: Path) -> tuple[Path, Tokenizer, Transformer]:
    tok = fim_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, initializer_range=0.3, n_routed_experts=0)).eval()
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    return tmp_path / "model", tok, model


def test_fim_exact_match_masks_one_line_per_document(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, tok, model = fim_checkpoint(tmp_path)
    docs = [DOC, "\n\nx = 1\n", "   \n"]  # the last has no non-empty line: skipped
    begin, hole, end = sentinel_ids(tok)

    def oracle(model, prompts, max_new, stop_token_ids):  # the true middle, then a newline and more
        assert stop_token_ids == (tok.eos_id, end)
        outs = []
        for p in prompts:
            prefix, suffix = tok.decode(p[1:p.index(hole)]), tok.decode(p[p.index(hole) + 1:-1])
            doc = next(d for d in docs if d.startswith(prefix) and d.endswith(suffix))
            outs.append(tok.encode(doc[len(prefix):len(doc) - len(suffix)] + "\nmore"))
        return outs

    monkeypatch.setattr(importlib.import_module("nanoseek.generate"), "generate", oracle)
    result = fim_exact_match(model, tok, docs, "psm", seed=0, max_new=8, batch_size=1)
    assert result["n"] == 2 and result["exact_match"] == 1.0
    assert [r["line"] for r in result["results"]][1] == "x = 1"
    # the masked lines' first 8 tokens in bits per byte, by hand in float64: both sides (FIM), then the prefix only
    model.double()

    def nats(prompt: list[int], target: list[int]) -> float:
        logp = torch.log_softmax(model(torch.tensor([prompt + target]))[0], -1)
        return -sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(target))

    fim = left = n_bytes = 0
    for r, doc in zip(result["results"], docs):
        prefix, suffix = doc[:doc.index(r["line"])], doc[doc.index(r["line"]) + len(r["line"]):]
        target = tok.encode(r["line"])[:8]
        fim += nats(infill_prompt(prefix, suffix, tok, "psm", model.config.max_position_embeddings - 8), target)
        left += nats([tok.eos_id if tok.bos_id is None else tok.bos_id, *tok.encode(prefix)], target)
        n_bytes += len(tok.decode(target).encode())
    assert result["line_bpb"] == pytest.approx(fim / math.log(2) / n_bytes, rel=1e-5)
    assert result["line_bpb_left_to_right"] == pytest.approx(left / math.log(2) / n_bytes, rel=1e-5)


def test_cli_infill_and_fim_eval(tmp_path, capsys: pytest.CaptureFixture) -> None:
    directory, tok, model = fim_checkpoint(tmp_path)
    (tmp_path / "a.py").write_text("def f(x):\n")
    (tmp_path / "b.py").write_text("\n    return y\n")
    assert cli.main(["generate", "--model", str(directory), "--prefix-file", str(tmp_path / "a.py"), "--suffix-file",
                     str(tmp_path / "b.py"), "--max-completion-length", "5"]) == 0
    prompt = infill_prompt("def f(x):\n", "\n    return y\n", tok, "psm")
    expected = tok.decode(generate(model, [prompt], 5, stop_token_ids=[tok.eos_id])[0])
    assert capsys.readouterr().out == expected + "\n"
    assert cli.main(["generate", "--model", str(directory), "--prefix-file", str(tmp_path / "a.py")]) == 2
    assert "--prefix-file and --suffix-file" in capsys.readouterr().err

    shards = tmp_path / "shards"
    shards.mkdir()
    ids = [i for doc in (DOC, "y = 2\nz = 3\n") for i in tok.encode(doc, add_bos=True, add_eos=True)]
    np.array(ids, dtype=np.uint16).tofile(shards / "val.bin")
    (shards / "index.json").write_text(json.dumps({"dtype": "uint16"}))
    assert val_documents(shards, tok) == [DOC, "y = 2\nz = 3\n"] and val_documents(shards, tok, 1) == [DOC]
    assert cli.main(["eval", "--model", str(directory), "--fim", "--data-dir", str(shards), "--fim-mode", "spm",
                     "--max-completion-length", "4", "--json", str(tmp_path / "fim.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and 0 <= summary["exact_match"] <= 1 and summary["mode"] == "spm"
    results = json.loads((tmp_path / "fim.json").read_text())["results"]
    assert [r["line"] for r in results][1] in ("y = 2", "z = 3") and results[0]["line"] in DOC.splitlines()
