"""`nanoseek prepare` shards and `pretrain --data-dir`: round trip, stable splits, bounded memory, bits per byte,
bad inputs, falling validation bpb, exact resume after kill -9, and 2 torchrun ranks equal to 1."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoseek import cli
from nanoseek.config import ModelConfig
from nanoseek.corpus import PrepareConfig, prepare, read_index
from nanoseek.data import LMBatch, ShardData, bits_per_byte, token_bytes
from nanoseek.fim import SENTINELS
from nanoseek.flops import flops_per_token
from nanoseek.metrics import read_metrics
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.pretrain import TrainConfig, validate

TOK = Tokenizer.char()
TRAIN = ["--preset", "tiny", "--seq-len", "16", "--batch-size", "4", "--warmup-steps", "2", "--no-progress"]


def corpus(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n):
        texts[str(folder / f"doc{i}.txt")] = f"document {i}\n" + "".join(f"line {i}.{j} = {i * j}\n" for j in range(i))
        (folder / f"doc{i}.txt").write_text(texts[str(folder / f"doc{i}.txt")])
    return texts


def shards(tmp_path, data, name="shards", tok=TOK, **kw):
    out = tmp_path / name
    kw = {"val_per_mille": 500, "workers": 1, **kw}
    return out, prepare(PrepareConfig(data=[str(d) for d in data], out=str(out), **kw), tok)


def documents(out, split):
    tok = Tokenizer.load(out)
    ids = np.memmap(out / f"{split}.bin", dtype=read_index(out)["dtype"], mode="r").tolist()
    return [tok.decode(ids[i + 1 : j]) for i, j in zip([-1] + [k for k, t in enumerate(ids) if t == tok.eos_id],
                                                      [k for k, t in enumerate(ids) if t == tok.eos_id])]


def test_shards_round_trip_and_workers_agree(tmp_path):
    texts = corpus(tmp_path / "src")
    out, index = shards(tmp_path, [tmp_path / "src"])
    docs = documents(out, "train") + documents(out, "val")
    assert sorted(docs) == sorted(texts.values())  # text -> shards -> the same text, every document once
    assert index["splits"]["val"]["documents"] > 0 and index["dtype"] == "uint16"
    assert sum(s["bytes"] for s in index["splits"].values()) == sum(len(t.encode()) for t in texts.values())
    assert all(Tokenizer.load(out).tok.token_to_id(s) is not None for s in SENTINELS)
    pooled, _ = shards(tmp_path, [tmp_path / "src"], name="pooled", workers=2)
    for f in ("train.bin", "val.bin", "index.json"):
        assert (out / f).read_bytes() == (pooled / f).read_bytes()


def test_split_is_stable_when_files_are_added(tmp_path):
    corpus(tmp_path / "src", 10)
    before, _ = shards(tmp_path, [tmp_path / "src"], "a")
    corpus(tmp_path / "src", 16)
    after, _ = shards(tmp_path, [tmp_path / "src"], "b")
    for split in ("train", "val"):
        assert set(documents(before, split)) <= set(documents(after, split))


def test_bpe_with_fim_is_deterministic_and_only_in_train(tmp_path):
    corpus(tmp_path / "src", 16)
    cfg = dict(tok=None, vocab_size=300, fim_rate=1.0)
    a, index = shards(tmp_path, [tmp_path / "src"], "a", **cfg)
    b, _ = shards(tmp_path, [tmp_path / "src"], "b", **cfg)
    assert (a / "train.bin").read_bytes() == (b / "train.bin").read_bytes()
    assert index["vocab_size"] == 303 and index["fim"] == {"rate": 1.0, "mode": "psm"}
    begin = Tokenizer.load(a).tok.token_to_id(SENTINELS[0])
    train, val = (np.fromfile(a / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    assert (train == begin).sum() == index["splits"]["train"]["documents"] and (val == begin).sum() == 0


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("the quick brown fox jumps over the lazy dog\n" * 12_000)  # 530k tokens, 1 MB of uint16
    out, index = shards(tmp_path, [big], val_per_mille=0)
    tok = Tokenizer.load(out)
    tracemalloc.start()
    data = ShardData(out, tok, 64, seed=0)
    for step in range(200):
        data.batch(step, 16)  # 200 x 16 x 65 tokens: 208k drawn from all over the corpus
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(data.train, np.memmap) and index["splits"]["train"]["tokens"] > 500_000
    assert peak < 2 * 16 * 65 * 8 + 200_000  # a batch or two and the token-bytes table, never the corpus


def test_bits_per_byte_against_a_hand_computation():
    assert bits_per_byte(math.log(2) * 12, 4) == pytest.approx(3.0)
    bpe = Tokenizer.train_bpe(["héllo wörld " * 20], vocab_size=270)
    table = token_bytes(bpe)
    for piece in ("é", "ö", "h", " w"):
        ids = bpe.encode(piece)
        assert int(table[ids].sum()) == len(piece.encode())
    assert table[bpe.eos_id] == 0 and token_bytes(TOK)[TOK.encode("a")[0]] == 1
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=bpe.vocab_size))
    ids = torch.tensor([bpe.encode("héllo wörld héllo", add_bos=True)])
    val = LMBatch(ids[:, :-1], ids[:, 1:])
    got = validate(model, val, table, 1, TrainConfig(), rank=0, world=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(val.input_ids)[0], -1)
    nats = -sum(logp[i, t].item() for i, t in enumerate(val.targets[0].tolist()))
    n_bytes = len("héllo wörld héllo".encode())  # the targets: every token after bos
    assert got["val/bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert got["val/loss"] == pytest.approx(nats / val.targets.numel(), rel=1e-5)
    assert F.cross_entropy(torch.zeros(1, 4), torch.tensor([0])).item() == pytest.approx(math.log(4))


def test_bad_inputs_name_the_file_and_the_fix(tmp_path, capsys):
    corpus(tmp_path / "src")
    (tmp_path / "src" / "__init__.txt").write_text("")
    out, index = shards(tmp_path, [tmp_path / "src"])
    assert index["skipped"]["empty"] == [str(tmp_path / "src" / "__init__.txt")]
    assert "skipped 1 empty file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n")
    with pytest.raises(ValueError, match="a.txt is empty"):
        shards(tmp_path, [empty], "e")
    (tmp_path / "src" / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.txt:1: not UTF-8.*--skip-bad-files"):
        shards(tmp_path, [tmp_path / "src"], "u")
    _, index = shards(tmp_path, [tmp_path / "src"], "u", skip_bad_files=True)
    assert index["skipped"]["not_utf8"] == [str(tmp_path / "src" / "latin1.txt")]
    with pytest.raises(ValueError, match="the val split has no documents: raise --val-per-mille"):
        shards(tmp_path, [tmp_path / "src" / "doc1.txt"], "v", val_per_mille=1)
    with pytest.raises(ValueError, match="the train split has no documents: lower --val-per-mille"):
        shards(tmp_path, [tmp_path / "src" / "doc1.txt"], "v", val_per_mille=999, overwrite=True)
    with pytest.raises(ValueError, match="matches no files"):
        shards(tmp_path, [tmp_path / "src" / "*.md"], "g")
    with pytest.raises(ValueError, match="already holds shards; pass --overwrite"):
        shards(tmp_path, [tmp_path / "src"], "shards")
    with pytest.raises(FileNotFoundError, match="nanoseek prepare"):
        ShardData(tmp_path / "src", TOK, 16)
    with pytest.raises(ValueError, match="another tokenizer than the model's"):
        ShardData(out, TOK, 16)  # the shards' tokenizer has the FIM sentinels
    bpe, _ = shards(tmp_path, [tmp_path / "src" / "doc1.txt"], "bpe", tok=None, vocab_size=300, val_per_mille=0)
    index = json.loads((bpe / "index.json").read_text())
    (bpe / "index.json").write_text(json.dumps({**index, "dtype": "uint8"}))
    with pytest.raises(ValueError, match=r"store uint8, too narrow for \d+ tokens; prepare again"):
        ShardData(bpe, Tokenizer.load(bpe), 16)
    assert cli.main(["pretrain", *TRAIN, "--data-dir", str(bpe), "--tokenizer", str(out), "--out",
                     str(tmp_path / "run")]) == 2
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert cli.main(["pretrain", *TRAIN, "--task", "arithmetic", "--eval-every", "2", "--out",
                     str(tmp_path / "run")]) == 2
    assert "--eval-every needs validation shards" in capsys.readouterr().err


def test_pretrain_on_stdlib_shards_lowers_val_bpb(tmp_path, capsys):
    out = tmp_path / "stdlib"
    assert cli.main(["prepare", "--corpus", "python-stdlib", "--limit", "60", "--vocab-size", "512",
                     "--val-per-mille", "100", "--out", str(out), "--workers", "1"]) == 0
    index = read_index(out)
    assert index["python"] == sys.version and index["splits"]["val"]["documents"] > 0
    run = tmp_path / "run"
    assert cli.main(["pretrain", "--data-dir", str(out), "--preset", "tiny", "--steps", "24", "--eval-every", "8",
                     "--eval-tokens", "2048", "--seq-len", "64", "--batch-size", "8", "--out", str(run),
                     "--no-progress", "--sample-every", "12", "--sample-prompts", "def ", "import"]) == 0
    records = read_metrics(run)
    bpb = [r["val/bpb"] for r in records if "val/bpb" in r]
    assert len(bpb) == 3 and bpb[0] > bpb[1] > bpb[2], bpb
    assert [r["step"] for r in records if "samples" in r] == [12, 24]
    assert all(len(r["samples"]) == 2 and all(isinstance(x, str) for x in r["samples"]) for r in records[11::12])
    assert [r["tokens"] for r in records] == [8 * 64 * n for n in range(1, 25)]
    flops = flops_per_token(ModelConfig.preset("tiny", vocab_size=index["vocab_size"]), 64)
    assert all(r["train/flops_per_token"] == flops and r["train/mfu"] > 0 for r in records)


def _pretrain(argv, env):
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_gives_the_same_losses(tmp_path):
    corpus(tmp_path / "src", 16)
    out, _ = shards(tmp_path, [tmp_path / "src"])
    argv = [*TRAIN, "--data-dir", str(out), "--steps", "40", "--save-every", "4", "--eval-every", "6",
            "--eval-tokens", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = _pretrain([*argv, "--out", str(tmp_path / "a")], env)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    killed = _pretrain([*argv, "--out", str(tmp_path / "b")], env)
    metrics = tmp_path / "b" / "metrics.jsonl"
    while killed.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 10):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    steps = len(read_metrics(tmp_path / "b"))
    assert 10 <= steps < 40, steps
    resumed = _pretrain([*argv, "--out", str(tmp_path / "b"), "--resume"], env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]

    def curve(run):
        wall_clock = ("train/tokens_per_s", "train/mfu", "time")
        return [{k: v for k, v in r.items() if k not in wall_clock} for r in read_metrics(run)]

    assert curve(tmp_path / "a") == curve(tmp_path / "b") and len(curve(tmp_path / "a")) == 40
    assert sum("val/bpb" in r for r in curve(tmp_path / "a")) == 7


def test_pretrain_data_files_are_prepared_once_into_the_run(tmp_path):
    corpus(tmp_path / "src", 16)
    run = tmp_path / "run"
    argv = ["pretrain", *TRAIN, "--data", str(tmp_path / "src"), "--steps", "4", "--out", str(run)]
    assert cli.main([*argv, "--stop-at", "2"]) == 0
    prepared = (run / "data" / "index.json").stat().st_mtime_ns
    assert read_index(run / "data")["splits"]["train"]["documents"] == 16  # no held-out split without --eval-every
    assert cli.main([*argv, "--resume"]) == 0 and len(read_metrics(run)) == 4
    assert (run / "data" / "index.json").stat().st_mtime_ns == prepared


def test_torchrun_two_ranks_equal_one(tmp_path):
    corpus(tmp_path / "src", 16)
    out, _ = shards(tmp_path, [tmp_path / "src"])
    argv = [*TRAIN, "--data-dir", str(out), "--steps", "4", "--eval-every", "2", "--eval-tokens", "68", "--batch-size",
            "8", "--grad-accum", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = _pretrain([*argv, "--out", str(tmp_path / "one")], env)
    assert one.wait(timeout=300) == 0, one.stderr.read()[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "nanoseek",
           "pretrain", *argv, "--out", str(tmp_path / "two")]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "val/loss", "val/bpb"):
        x, y = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
        assert len(x) == len(y) > 0 and max(abs(p - q) for p, q in zip(x, y)) < 1e-5, (key, x, y)


def test_a_hub_dataset_is_streamed(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20)))
    _, index = shards(tmp_path, [], dataset=str(tmp_path / "hub"), limit=12)
    assert sum(s["documents"] for s in index["splits"].values()) == 12 and index["source"]["dataset"]
