"""Token batches: file records with errors naming file:line, SFT masking, packing, deterministic per-step batches."""

import json

import pytest
import torch

from nanoseek.corpus import PrepareConfig, prepare
from nanoseek.data import IGNORE, SFTData, ShardData, TaskData, make_data, pad_rows, sft_rows
from nanoseek.datasets import Row
from nanoseek.tasks import in_eval_split
from nanoseek.tokenizer import Tokenizer

TOK = Tokenizer.char()


def text_data(files, seq_len, tmp_path, seed=0):
    """Pretraining on files: prepared into shards (`nanoseek prepare`), read memory-mapped."""
    out = tmp_path / "shards"
    prepare(PrepareConfig(data=[str(f) for f in files], out=str(out), val_per_mille=0, workers=1, overwrite=True), TOK)
    return ShardData(out, Tokenizer.load(out), seq_len, seed)


def test_sft_rows_mask_the_prompt():
    (toks, n_prompt), longer = sft_rows(TOK, [Row("2+3=", "5"), Row("10+30=", "40")], 16)
    assert toks == [TOK.bos_id, *TOK.encode("2+3="), *TOK.encode("5"), TOK.eos_id] and n_prompt == 5
    b = pad_rows([(toks, n_prompt), longer], TOK.pad_id)
    assert b.input_ids.shape == (2, 9)  # the longer row: bos + 6 + 2 + eos = 10 tokens -> 9 inputs
    assert b.targets[0].tolist() == [IGNORE] * 4 + [TOK.encode("5")[0], TOK.eos_id] + [IGNORE] * 3
    assert b.input_ids[0, 6:].tolist() == [TOK.pad_id] * 3
    assert b.targets[1].tolist() == [IGNORE] * 6 + TOK.encode("40") + [TOK.eos_id]


def test_task_batches_are_deterministic_and_train_split_only():
    data = TaskData("arithmetic", TOK, "sft", 16, seed=3)
    a, b = data.batch(5, 16), data.batch(5, 16)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, data.batch(6, 16).input_ids)
    for row in a.input_ids:
        assert not in_eval_split(TOK.decode(row.tolist()).split("=")[0] + "=")
    countdown = TaskData("countdown", TOK, "sft", 16, seed=3)  # its own held-out fraction (one in four)
    for row in countdown.batch(0, 64).input_ids:
        assert not in_eval_split(TOK.decode(row.tolist()).split("=")[0] + "=", countdown.task)
    packed = TaskData("arithmetic", TOK, "pretrain", 16).batch(0, 4)
    assert packed.input_ids.shape == packed.targets.shape == (4, 16)
    assert torch.equal(packed.input_ids[:, 1:], packed.targets[:, :-1])  # targets are inputs shifted by one


def test_file_data_epochs_cover_every_chunk(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("abcdefghij" * 10)
    data = text_data([f], 10, tmp_path)
    assert data.n == (102 - 1) // 10  # bos + 100 chars + eos
    firsts = [data.batch(step, 2).input_ids[:, 0].tolist() for step in range(data.n // 2)]
    for epoch in range(3):
        seen = sorted(data.chunk(epoch * data.n + i) for i in range(data.n))  # the chunks of one epoch
        assert seen == list(range(data.n)) and len(firsts) == data.n // 2
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"{i}*2=", "completion": str(2 * i)}) for i in range(5)) + "\n")
    sft = SFTData([pairs], TOK, seq_len=16)
    b = sft.batch(0, 5)
    assert sorted(TOK.decode(r.tolist()) for r in b.input_ids)[0].startswith("0*2=0")


def test_readers_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="missing.txt not found"):
        text_data([tmp_path / "missing.txt"], 16, tmp_path)
    with pytest.raises(ValueError, match="no data files"):
        text_data([], 16, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1=", "completion": "1"}\n\n{"text": oops}\n')
    for read in (lambda: text_data([bad], 16, tmp_path), lambda: make_data("sft", TOK, 16, 0, files=[bad])):
        with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
            read()
    bad.write_text('{"text": "ok"}\n{"prompt": "only a prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a \"text\" string.*\['prompt'\]"):
        text_data([bad], 16, tmp_path)
    bad.write_text('{"text": "a document"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no column 'prompt'"):
        SFTData([bad], TOK, 16)
    doc = tmp_path / "doc.txt"
    doc.write_text("a document")
    with pytest.raises(ValueError, match=r"doc.txt: got a text document"):
        SFTData([doc], TOK, 16)
    bad.write_bytes(b'{"text": "ok"}\n\xff\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8"):
        text_data([bad], 16, tmp_path)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 40, "completion": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"long.jsonl:1: example has 42 tokens, more than --seq-len 16"):
        SFTData([long], TOK, 16)
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="too few for one sequence"):
        text_data([short], 64, tmp_path)
    with pytest.raises(ValueError, match="raise --seq-len"):
        TaskData("arithmetic", TOK, "sft", 4)
