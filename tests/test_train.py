"""The pretraining/SFT loop: loss falls, exact resume after Ctrl-C, the loss terms against hand-computed ones,
the aux-loss-free bias update (sign, accumulation, imbalance), transformers loading a trained checkpoint,
clear errors on bad input, and the command-line contract."""

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, cli
from nanoseek.checkpoint import latest_checkpoint
from nanoseek.data import IGNORE, TaskData
from nanoseek.metrics import MetricsLogger, read_metrics
from nanoseek.model.moe import RouterStats
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.pretrain import TrainConfig, build_model_config, micro_loss, train
from nanoseek.train.schedule import lr_at, param_groups

FAST = dict(batch_size=8, seq_len=24, warmup_steps=2, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def balanced_run(tmp_path_factory):
    """30 steps with the bias update on (γ = 0.02), shared by several tests."""
    out = tmp_path_factory.mktemp("gamma")
    summary = train(TrainConfig(steps=30, bias_gamma=0.02, out=str(out), **{**FAST, "batch_size": 16, "seq_len": 32}))
    return out, summary


def test_loss_goes_down(balanced_run):
    out, summary = balanced_run
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert summary["final_loss"] == recs[-1]["loss"]
    assert recs[-1]["loss"] < 0.6 * recs[0]["loss"]  # ~5.5 (uniform over 256) -> below 3.3
    assert recs[-1]["mtp_loss"] < 0.7 * recs[0]["mtp_loss"]
    for key in ("lr", "grad_norm", "train/tokens_per_s", "train/mfu", "balance_loss", "expert_load_max_mean"):
        assert key in recs[-1]
    assert len(recs[-1]["expert_load_max_mean"]) == 2  # one MoE layer + the MTP block's MoE


def test_bias_update_reduces_imbalance(tmp_path):
    """Weights frozen (lr 0), so the two runs differ only in the biases: from a start where the busiest expert
    takes over twice the mean load, 30 updates with γ = 0.02 bring the late imbalance well below the run without."""
    fast = {**FAST, "lr": 0.0, "batch_size": 16, "seq_len": 32}
    runs = {g: tmp_path / f"gamma{g}" for g in (0.02, 0.0)}
    for g, out in runs.items():
        train(TrainConfig(steps=30, bias_gamma=g, seed=1, out=str(out), **fast))
    loads = {g: [r["expert_load_max_mean"][0] for r in read_metrics(out)] for g, out in runs.items()}
    assert loads[0.0][0] == loads[0.02][0] > 2
    assert sum(loads[0.02][-10:]) < 0.8 * sum(loads[0.0][-10:])
    with_bias = Transformer.from_pretrained(latest_checkpoint(runs[0.02]))
    assert with_bias.moe_layers()[0].gate.e_score_correction_bias.abs().max() > 0
    without = Transformer.from_pretrained(latest_checkpoint(runs[0.0]))
    assert without.moe_layers()[0].gate.e_score_correction_bias.abs().max() == 0


def test_trained_checkpoint_loads_in_transformers(balanced_run):
    transformers = pytest.importorskip("transformers")
    ckpt = latest_checkpoint(balanced_run[0])
    ours = Transformer.from_pretrained(ckpt).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)
    assert Tokenizer.load(ckpt).vocab_size == Tokenizer.char().vocab_size


def test_exact_resume_after_ctrl_c(tmp_path, monkeypatch):
    """20 steps straight == Ctrl-C after step 10 + --resume, bit for bit (MTP, bias update, accumulation on)."""
    cfg = dict(steps=20, grad_accum=2, bias_gamma=0.01, mtp_lambda=0.3, **FAST)
    straight = train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    log = MetricsLogger.log

    def interrupt_at_9(self, step, **values):
        log(self, step, **values)
        if step == 9:
            os.kill(os.getpid(), signal.SIGINT)  # the handler lets step 10 finish, saves, stops

    monkeypatch.setattr(MetricsLogger, "log", interrupt_at_9)
    first = train(TrainConfig(out=str(tmp_path / "b"), **cfg))
    monkeypatch.undo()
    assert first["steps"] == 10 and latest_checkpoint(tmp_path / "b").name == "step_00000010"
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **cfg))
    assert resumed["resumed_from"].endswith("step_00000010") and resumed["steps"] == 20

    def curve(run):
        wall_clock = ("train/tokens_per_s", "train/mfu", "time")
        return [{k: v for k, v in r.items() if k not in wall_clock} for r in read_metrics(run)]

    assert curve(tmp_path / "a") == curve(tmp_path / "b")  # every logged number, exactly
    a = Transformer.from_pretrained(straight["checkpoint"]).state_dict()
    b = Transformer.from_pretrained(resumed["checkpoint"]).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = torch.load(os.path.join(straight["checkpoint"], "optimizer.pt"))
    ob = torch.load(os.path.join(resumed["checkpoint"], "optimizer.pt"))
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"])


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_micro_loss_matches_hand_computation(mode):
    """L = CE + λ/D Σ_k CE_k + α L_Bal, recomputed from the raw token rows in float64 on the same forward's
    outputs; SFT counts completion + eos only."""
    cfg = TrainConfig(mode=mode, mtp_lambda=0.3, balance_alpha=0.01, seq_len=16)
    tok = Tokenizer.char()
    config = build_model_config(cfg, tok)
    model = Transformer(config).train()
    batch = TaskData("arithmetic", tok, mode, 16).batch(0, 4)
    tokens = torch.cat([batch.input_ids, batch.targets[:, -1:]], dim=1)  # (B, T+1), valid in pretrain mode
    if mode == "sft":
        for row_in, row_t in zip(batch.input_ids, batch.targets):
            n = int((row_t != IGNORE).sum())
            text = tok.decode(row_in.tolist())
            assert n == len(text.split("=")[1]) + 1  # the completion's characters and eos
            assert row_t[row_t != IGNORE][-1] == tok.eos_id
    n_tokens = [int((batch.targets[:, k:] != IGNORE).sum()) for k in range(2)]
    loss, parts = micro_loss(model, model, batch, cfg, n_tokens, rows_scale=1.0, use_mtp=True)

    logits, (mtp1,) = model(batch.input_ids, return_mtp=True)
    logits, mtp1 = logits.double(), mtp1.double()
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
    if mode == "pretrain":  # depth 1, row i predicts token i+2 of the row
        T = batch.input_ids.shape[1]
        ce1 = F.cross_entropy(mtp1.flatten(0, 1), tokens[:, 2 : T + 1].flatten())
    else:
        ce1 = F.cross_entropy(mtp1.flatten(0, 1), batch.targets[:, 1:].flatten(), ignore_index=IGNORE)
    stats = RouterStats(balance=True)
    model(batch.input_ids, return_mtp=True, router_stats=stats)
    bal = sum(v.double() for v in stats.balance_loss.values())
    assert len(stats.balance_loss) == len(model.moe_layers())  # the MTP block's MoE included
    torch.testing.assert_close(loss.double(), ce + 0.3 * ce1 + 0.01 * bal, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts[0], ce.detach() * n_tokens[0], rtol=1e-6, atol=0)



def test_balance_alpha_defaults_to_the_model_configs_aux_loss_alpha():
    """Without --balance-alpha the sequence-wise balance loss weight is ModelConfig.aux_loss_alpha; presets carry
    the V3 value 1e-4."""
    assert TrainConfig().balance_alpha is None
    assert all(ModelConfig.preset(name).aux_loss_alpha == 1e-4 for name in ("tiny", "small", "deepseek-v3"))
    tok = Tokenizer.char()
    model = Transformer(build_model_config(TrainConfig(seq_len=16), tok).replace(aux_loss_alpha=0.05)).train()
    batch = TaskData("arithmetic", tok, "pretrain", 16).batch(0, 4)
    n_tokens = [int((batch.targets != IGNORE).sum())]
    losses = {}
    for alpha in (None, 0.05, 0.0):
        losses[alpha], parts = micro_loss(model, model, batch, TrainConfig(seq_len=16, balance_alpha=alpha), n_tokens,
                                          rows_scale=1.0, use_mtp=False)
    assert parts[-1] > 0.5  # Σ_layers Σ_i f_i P_i is ~1 per layer
    assert losses[None].item() == losses[0.05].item()
    assert (losses[None] - losses[0.0]).item() == pytest.approx(0.05 * parts[-1].item(), rel=1e-4)

def test_bias_update_sums_micro_batches(tmp_path):
    """With lr = 0 one step changes only the biases: b = γ·sign(mean − load) of the whole global batch,
    the same with 1 or 4 micro-batches; the most loaded expert's bias goes down."""
    base = dict(steps=1, lr=0.0, bias_gamma=0.01, **{k: v for k, v in FAST.items() if k != "lr"})
    biases = []
    for accum in (1, 4):
        s = train(TrainConfig(grad_accum=accum, out=str(tmp_path / str(accum)), **base))
        trained = Transformer.from_pretrained(s["checkpoint"])
        biases.append([m.gate.e_score_correction_bias for m in trained.moe_layers()])
    cfg = TrainConfig(**base)
    tok = Tokenizer.char()
    torch.manual_seed(cfg.seed)
    model = Transformer(build_model_config(cfg, tok)).train()
    stats = RouterStats()
    model(TaskData("arithmetic", tok, "pretrain", cfg.seq_len).batch(0, cfg.batch_size).input_ids, return_mtp=True,
          router_stats=stats)
    for m, b1, b4 in zip(model.moe_layers(), *biases):
        load = stats.load[m.layer_idx]
        expected = 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(b1, expected, rtol=0, atol=0)
        torch.testing.assert_close(b4, expected, rtol=0, atol=0)
        assert b1[load.argmax()] < 0 and b1[load.argmin()] > 0


def test_param_groups_and_schedules():
    model = Transformer(build_model_config(TrainConfig(), Tokenizer.char()))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed_tokens.weight) in ids and id(model.norm.weight) in ids
    assert all(id(p) in ids for name, p in model.named_parameters() if "norm" in name)
    assert all(p.ndim >= 2 for p in decay["params"]) and id(model.lm_head.weight) not in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cos = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cos, 110) == pytest.approx(0.1) and lr_at(9, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, cos, 110) == pytest.approx(0.55) and lr_at(110, cos, 110) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="wsd", decay_frac=0.1, min_lr_ratio=0.0)
    assert lr_at(50, wsd, 110) == 1.0 and lr_at(98, wsd, 110) == 1.0  # decay: the last 11 steps
    assert lr_at(104, wsd, 110) == pytest.approx(5 / 11) and lr_at(109, wsd, 110) == pytest.approx(0.0)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(overrides={"n_expertz": 4}), "unknown model config key.*n_expertz"),
    (dict(data=["/nonexistent/corpus.txt"]), "corpus.txt not found"),
    (dict(seq_len=1000), "--seq-len 1000 exceeds the model's max_position_embeddings 256"),
    (dict(batch_size=6, grad_accum=4), "--batch-size 6 must divide"),
    (dict(steps=0), "--steps"),
])
def test_bad_input_fails_before_training(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(out=str(tmp_path / "run"), **{**FAST, **changes}))
    assert not (tmp_path / "run").exists()


def test_bad_files_fail_before_training(tmp_path):
    cfg_file = tmp_path / "model.json"
    cfg_file.write_text(json.dumps({"hidden_size": 64, "num_expert": 4}))
    with pytest.raises(ValueError, match="model.json.*unknown ModelConfig field.*num_expert"):
        train(TrainConfig(model_config=str(cfg_file), out=str(tmp_path / "run"), **FAST))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        train(TrainConfig(data=[str(empty)], out=str(tmp_path / "run"), **FAST))
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": 4\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: malformed JSON"):
        train(TrainConfig(mode="sft", data=[str(bad)], out=str(tmp_path / "run"), **FAST))
    assert not (tmp_path / "run").exists()


def test_cli_contract_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--preset", "tiny", "--task", "arithmetic", "--steps", "3", "--out", str(out), "--seed", "1",
            "--batch-size", "4", "--seq-len", "16", "--no-progress"]
    assert cli.main(argv) == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(isinstance(r["loss"], float) for r in recs)
    assert cli.main([*argv[:6], "5", *argv[7:], "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert cli.main(["pretrain", "--set", "bogus=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model config key" in capsys.readouterr().err
    assert cli.main(["plot", str(out)]) == 0 and (out / "metrics.png").stat().st_size > 1000


def test_sft_and_bpe_text_from_the_cli(tmp_path):
    """A BPE trained by `nanoseek prepare`, pretraining on a text file with it, then SFT (bf16) on JSONL pairs."""
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    tok_dir = str(tmp_path / "tok")
    assert cli.main(["prepare", "--data", str(text), "--vocab-size", "300", "--val-per-mille", "0",
                     "--out", tok_dir]) == 0
    base = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--warmup-steps", "1"]
    assert cli.main(["pretrain", "--data", str(text), "--tokenizer", tok_dir, "--out",
                     str(tmp_path / "pt"), *base]) == 0
    ckpt = latest_checkpoint(tmp_path / "pt")
    assert Transformer.from_pretrained(ckpt).config.vocab_size == Tokenizer.load(tok_dir).vocab_size > 256
    assert Tokenizer.load(ckpt).vocab_size == Tokenizer.load(tok_dir).vocab_size
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    assert cli.main(["sft", "--data", str(pairs), "--model", str(ckpt), "--out", str(tmp_path / "sft"), "--bf16",
                     *base]) == 0
    recs = read_metrics(tmp_path / "sft")
    assert len(recs) == 2 and all(r["loss"] == r["loss"] for r in recs)  # finite




def test_pretrain_help_lists_no_sft_flags(capsys):
    """`pretrain --help` has no dataset columns or system prompt; `sft --help` has them; both use the shared names."""
    helps = {}
    for command in ("pretrain", "sft"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        helps[command] = capsys.readouterr().out
    sft_only = ("--dataset", "--prompt-column", "--completion-column", "--messages-column", "--system-prompt")
    assert not any(flag in helps["pretrain"] for flag in sft_only)
    assert all(flag in helps["sft"] for flag in sft_only)
    for text in helps.values():
        for flag in ("--model", "--save-every", "--warmup-steps", "--lr-schedule", "--max-grad-norm", "--keep"):
            assert flag in text, flag


def test_summary_schema_and_stop_at(tmp_path):
    """Pretraining's summary has the keys every trainer returns; --stop-at saves and stops like a preemption."""
    summary = train(TrainConfig(steps=4, stop_at=2, out=str(tmp_path / "run"), **FAST))
    assert {"steps", "wall_time_s", "interrupted", "run_dir", "checkpoint", "resumed_from"} <= set(summary)
    assert summary["steps"] == 2 and not summary["interrupted"] and summary["checkpoint"].endswith("step_00000002")
    assert (tmp_path / "run" / "pretrain_config.json").is_file()
