"""Logit parity with transformers' DeepseekV2/V3 on the same random weights, both directions (fp32, 1e-4)."""

import pytest
import torch
from builders import randomize_

from nanoseek import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)
YARN_V3 = dict(YARN, mscale=1.0, mscale_all_dim=0.8)  # unequal: exercises YaRN's cos/sin attention factor

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1,
            max_position_embeddings=128, initializer_range=0.3)

CASES = {
    "v3-qlora-groups-yarn": dict(model_type="deepseek_v3", q_lora_rank=24, n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5, rope_scaling=YARN_V3),
    "v3-noqlora-1group-nointerleave": dict(model_type="deepseek_v3", q_lora_rank=None, n_group=1, topk_group=1,
                                           rope_interleave=False, norm_topk_prob=False, n_shared_experts=2),
    "v3-dense-first-two": dict(model_type="deepseek_v3", q_lora_rank=16, n_group=2, topk_group=1,
                               first_k_dense_replace=2, rope_scaling=YARN),
    "v2-lite-greedy": dict(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax",
                           topk_method="greedy", norm_topk_prob=False, n_shared_experts=2),
    "v2-group-limited-yarn": dict(model_type="deepseek_v2", q_lora_rank=24, scoring_func="softmax",
                                  topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                  routed_scaling_factor=16.0, norm_topk_prob=False, rope_scaling=YARN),
}


def make_config(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[name]})


def hf_logits(directory, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits, hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_nanoseek_to_hf(case, tmp_path):
    model = Transformer(make_config(case)).eval()
    randomize_(model)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (3, 29))
    with torch.no_grad():
        ours = model(ids)
    theirs, _ = hf_logits(tmp_path, ids)
    assert ours.abs().max() > 1.0  # a real signal, not near-zero logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_nanoseek(case, tmp_path):
    cfg = make_config(case)
    hf_cls = transformers.DeepseekV3Config if cfg.model_type == "deepseek_v3" else transformers.DeepseekV2Config
    d = cfg.to_dict()
    hf_cfg = hf_cls(**{k: v for k, v in d.items() if k not in ("architectures", "extra")})
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = Transformer.from_pretrained(tmp_path).eval()(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
             max_position_embeddings=64)


@pytest.mark.parametrize("hf_cls,extra", [
    ("DeepseekV2Config", {}),  # n_group / topk_group null, greedy softmax routing
    ("DeepseekV2Config", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    ("DeepseekV3Config", dict(n_group=2, topk_group=1)),  # num_key_value_heads left at 128 (MLA ignores it)
])
def test_transformers_default_config_json_loads(hf_cls, extra, tmp_path):
    """A config.json as transformers writes it from its own defaults (small sizes) loads with equal logits."""
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, hf_cls)(**SMALL, **extra)).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 17))
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = Transformer.from_pretrained(tmp_path).eval()(ids)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_test_extras_are_pinned():
    """The suite depends on transformers' modeling code and TRL internals: constraints.txt pins every package of the
    test extra (and torch) to the versions it is verified with."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    test_extra = re.search(r"^test = \[(.*?)\]$", (root / "pyproject.toml").read_text(), re.M | re.S)[1]
    extra = re.findall(r'"([^"]+)"', re.sub(r"#.*", "", test_extra))
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (root / "constraints.txt").read_text(), re.M))
    for requirement in [*extra, "torch"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0]
        assert name in pins, f"constraints.txt does not pin {name}"
