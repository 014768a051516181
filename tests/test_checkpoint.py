"""Checkpoints: exact round trip of weights, optimizer and state; pruning; a crash mid-save leaves the previous
checkpoint loadable and ``latest`` pointing at it."""

import pytest
import torch

import nanoseek.checkpoint as ckpt_mod
from nanoseek.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer


def trained_pair():
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 8))).square().mean().backward()
    opt.step()
    model.moe_layers()[0].gate.e_score_correction_bias.add_(torch.arange(8.0))
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = trained_pair()
    saved_rng = rng_state()
    expected = torch.rand(3)  # what the RNG gives right after the saved state
    path = save_checkpoint(tmp_path, 7, model, opt, {"data_position": 56, "rng": saved_rng},
                           tokenizer=Tokenizer.char())
    assert path.name == "step_00000007" and latest_checkpoint(tmp_path) == path
    assert {"config.json", "model.safetensors", "optimizer.pt", "state.pt", "tokenizer.json"} <= {
        p.name for p in path.iterdir()}
    fresh = Transformer(model.config)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    torch.manual_seed(123)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 7 and state["data_position"] == 56
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], fresh_opt.state_dict()["state"][i]["exp_avg"])
    set_rng_state(state["rng"])  # the RNG continues from where it was saved
    assert torch.equal(torch.rand(3), expected)


def test_keeps_the_newest(tmp_path):
    model, opt = trained_pair()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("crash_in", ["optimizer", "pointer"])
def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch, crash_in):
    model, opt = trained_pair()
    first = save_checkpoint(tmp_path, 1, model, opt, {"marker": "one"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError("simulated crash (disk full / killed)")

    if crash_in == "optimizer":  # after the weights are written, before the directory is complete
        real_save = torch.save
        monkeypatch.setattr(ckpt_mod.torch, "save",
                            lambda obj, f, *a, **k: boom() if str(f).endswith("optimizer.pt") else real_save(obj, f))
    else:  # after the new directory is in place, while replacing the pointer
        monkeypatch.setattr(ckpt_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model, opt, {"marker": "two"})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    fresh = Transformer(model.config)
    assert load_checkpoint(latest_checkpoint(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))["marker"] == "one"
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k
    save_checkpoint(tmp_path, 3, model, opt)  # the next save cleans up what the crash left
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_incomplete_directory_is_rejected(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "half", Transformer(ModelConfig.preset("tiny")))


def test_transformers_model_round_trip(tmp_path):
    """A transformers causal LM (tied embeddings) checkpoints and reloads in place too (GRPO on HF models)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    path = save_checkpoint(tmp_path, 1, model, state={"x": 1})
    fresh = transformers.LlamaForCausalLM(cfg)
    assert load_checkpoint(path, fresh)["x"] == 1
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.001])  # cut in the tensor data / inside the header
def test_truncated_weights_name_the_file(tmp_path, keep):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 1, model, opt)
    _truncate(path / "model.safetensors", keep)
    with pytest.raises(ValueError, match=rf"{path / 'model.safetensors'}: unreadable safetensors file"):
        Transformer.from_pretrained(path)
    with pytest.raises(ValueError, match=rf"{path / 'model.safetensors'}: unreadable safetensors file"):
        load_checkpoint(path, Transformer(model.config))


def test_missing_shard_names_the_file(tmp_path):
    model = Transformer(ModelConfig.preset("tiny"))
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=str(shard)):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["weights", "state", "optimizer"])
def test_resume_falls_back_to_newest_intact_checkpoint(tmp_path, capsys, damage):
    model, opt = trained_pair()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"rng": rng_state()})
    newest = tmp_path / "checkpoints" / "step_00000003"
    _truncate(newest / {"weights": "model.safetensors", "state": "state.pt", "optimizer": "optimizer.pt"}[damage])
    assert latest_checkpoint(tmp_path, verify=False) == newest
    chosen = latest_checkpoint(tmp_path)
    assert chosen.name == "step_00000002"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(newest) in err[0] and str(chosen) in err[0]
    assert load_checkpoint(chosen, Transformer(model.config))["step"] == 2


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    model, opt = trained_pair()
    for step in (1, 2):
        _truncate(save_checkpoint(tmp_path, step, model, opt) / "state.pt")
    with pytest.raises(ValueError, match="every checkpoint is damaged: step_00000002: .*; step_00000001: "):
        latest_checkpoint(tmp_path)


def test_resume_with_another_model_names_the_mismatch(tmp_path):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 1, model, opt)
    other = Transformer(model.config.replace(hidden_size=96))
    with pytest.raises(ValueError, match=r"another model \(hidden_size: checkpoint 64 vs model 96\)"):
        load_checkpoint(path, other)
    other = Transformer(model.config.replace(rope_theta=500.0, num_experts_per_tok=3))
    with pytest.raises(ValueError, match=r"num_experts_per_tok: checkpoint 2 vs model 3; rope_theta: checkpoint "
                                         r"10000.0 vs model 500.0"):
        load_checkpoint(path, other)


def test_transformers_model_mismatch_names_the_tensor(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    path = save_checkpoint(tmp_path, 1, transformers.LlamaForCausalLM(cfg))
    cfg.intermediate_size = 48
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight: checkpoint \(32, 64\) vs model "
                                         r"\(32, 48\)"):
        load_checkpoint(path, transformers.LlamaForCausalLM(cfg))


def test_run_directories_load_like_model_directories(tmp_path):
    """``Transformer.from_pretrained(RUN_DIR)`` and ``sft --model RUN_DIR`` (the README's R1 example) take the run's
    latest checkpoint, as every command does."""
    import json

    from nanoseek.cli import main

    small = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--warmup-steps", "0"]
    assert main(["sft", "--task", "arithmetic", "--out", str(tmp_path / "sft"), *small]) == 0
    latest = latest_checkpoint(tmp_path / "sft")
    ours, want = (Transformer.from_pretrained(p).state_dict() for p in (tmp_path / "sft", latest))
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    verified = tmp_path / "verified.jsonl"
    verified.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(4)))
    assert main(["sft", "--model", str(tmp_path / "sft"), "--dataset", str(verified), "--out", str(tmp_path / "rft"),
                 *small]) == 0
    tuned = Transformer.from_pretrained(tmp_path / "rft")
    assert tuned.config == Transformer.from_pretrained(latest).config
