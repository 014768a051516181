import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoseek import cli
from nanoseek.config import ModelConfig
from nanoseek.flops import flops_per_token, measure_peak_flops, mfu
from nanoseek.metrics import MetricsLogger, greedy_samples, read_metrics
from nanoseek.model import moe
from nanoseek.model.transformer import Transformer
from nanoseek.report import series


def counted_flops_per_token(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """torch's count of a training forward + backward (main and MTP logits), SDPA as plain matmuls."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits, mtp = model(ids, return_mtp=True)
        (logits.sum() + sum(m.sum() for m in mtp)).backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize("overrides", [
    {},  # MLA with low-rank q
    {"q_lora_rank": None, "n_shared_experts": 2},
    {"attention_type": "mha", "head_dim": 16, "num_key_value_heads": 2},  # GQA
])
def test_flops_match_torch_counter_when_every_expert_is_active(overrides: dict) -> None:
    # v_head_dim = d_h + d_R: MLA's SDPA pads v to q's width, which only equal widths make the same arithmetic
    cfg = ModelConfig(vocab_size=64, n_routed_experts=2, num_experts_per_tok=2, v_head_dim=24,
                      num_nextn_predict_layers=2, **overrides)
    assert counted_flops_per_token(cfg, 2, 16) == pytest.approx(flops_per_token(cfg, 16), rel=1e-9)


def test_flops_count_only_the_active_routed_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    # 512 tokens take the routed path; the per-expert loop (which torch's counter sees) multiplies only the
    # rows sent to each expert
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda device, dtype: False)
    cfg = ModelConfig(vocab_size=64, n_routed_experts=4, num_experts_per_tok=2, v_head_dim=24,
                      num_nextn_predict_layers=1, max_position_embeddings=128)
    assert counted_flops_per_token(cfg, 4, 128) == pytest.approx(flops_per_token(cfg, 128), rel=1e-9)


def test_mfu_and_peak() -> None:
    assert mfu(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
    peak = measure_peak_flops("cpu", torch.float32, size=128, repeats=2)
    assert 1e6 < peak < 1e15


def test_log_lines_without_a_terminal_and_time_across_resume(tmp_path, capsys: pytest.CaptureFixture) -> None:
    logger = MetricsLogger(tmp_path, 6, log_every=2)  # pytest's stderr is not a terminal: lines, no bar
    for step in range(1, 5):
        logger.log(step, loss=3.0 - step / 10, **{"val/bpb": 1.5, "train/tokens_per_s": 2048.0, "train/mfu": 0.031})
    logger.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 2/6 loss 2.8 val_bpb 1.5 tok/s 2,048 mfu 3.10% eta 0m")
    first = read_metrics(tmp_path)
    assert [r["step"] for r in first] == [1, 2, 3, 4] and first[0]["time"] <= first[-1]["time"]
    resumed = MetricsLogger(tmp_path, 6, start_step=3, progress=False)
    resumed.log(4, loss=1.0)
    resumed.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[3]["time"] >= first[2]["time"]


def test_tensorboard_scalars_or_a_clear_error(tmp_path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'nanoseek\[tensorboard\]'"):
            MetricsLogger(tmp_path, 2, progress=False, report_to="tensorboard")
        return
    logger = MetricsLogger(tmp_path, 2, progress=False, report_to="tensorboard")
    logger.log(1, loss=2.0, **{"train/mfu": 0.1})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_plot_curves_against_tokens_and_time(tmp_path, capsys: pytest.CaptureFixture) -> None:
    records = [{"step": s, "loss": 3.0 / s, "tokens": 512 * s, "time": 0.5 * s, "lr": 1e-3} for s in range(1, 9)]
    for r in records[1::4]:
        r.update({"val/loss": r["loss"] + 0.1, "val/bpb": 1.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / f"metrics{s}.png") for s in ("", "_tokens", "_time")]
    assert all((tmp_path / f"metrics{s}.png").stat().st_size > 1000 for s in ("", "_tokens", "_time"))
    assert set(series(records, "tokens")["val/bpb"][0]) == {1024, 3072} and "time" not in series(records)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "time": 0.1}) + "\n")
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "p.png")]  # no tokens: only the per-step plot


def test_greedy_samples_are_text_continuations() -> None:
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.char()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_routed_experts=0))
    samples = greedy_samples(model, tok, ["def f(", "x = "], 5)
    assert len(samples) == 2 and all(isinstance(s, str) and len(s) <= 5 for s in samples)
    assert samples == greedy_samples(model, tok, ["def f(", "x = "], 5)
