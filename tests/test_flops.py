import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoseek.config import ModelConfig
from nanoseek.flops import flops_per_token, measure_peak_flops, mfu
from nanoseek.model import moe
from nanoseek.model.transformer import Transformer


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
