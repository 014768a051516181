"""Latent KV cache: incremental decode (absorbed and naive) equals the full forward at every step, for ragged
batches with YaRN on; bytes per token measured from the allocated tensors; batch-row selection."""

import pytest
import torch
from builders import randomize_

from nanoseek import ModelConfig, Transformer
from nanoseek.cache import elements_per_token

YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=0.8)
BASE = dict(vocab_size=61, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            n_routed_experts=6, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
            initializer_range=0.2, rope_scaling=YARN)
CONFIGS = {
    "v3-qlora": dict(model_type="deepseek_v3", q_lora_rank=24),
    "v2-noqlora-nointerleave": dict(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax",
                                    topk_method="greedy", rope_interleave=False),
    "mha": dict(attention_type="mha", head_dim=12),
    "gqa": dict(attention_type="mha", head_dim=12, num_key_value_heads=2, rope_scaling=None),
}




def make(name: str) -> Transformer:
    model = Transformer(ModelConfig(**{**BASE, **CONFIGS[name]})).eval()
    randomize_(model, scale=0.2)
    return model


CASES = [(name, impl) for name in sorted(CONFIGS) for impl in ("absorb", "naive")
         if impl == "absorb" or CONFIGS[name].get("attention_type", "mla") == "mla"]  # naive/absorb: an MLA choice


@pytest.mark.parametrize("name,impl", CASES)
def test_incremental_decode_matches_full_forward(name, impl):
    """Ragged right-padded prefill, then token-by-token decode (plus one 3-token chunk, the speculative-verify
    shape); every step's logits equal the full forward of that row's whole sequence (fp32, 1e-4)."""
    model = make(name)
    model.set_decode_impl(impl)
    torch.manual_seed(0)
    prompt_lens, steps = [5, 11, 2], [1, 1, 3, 1, 1, 1]
    seqs = [torch.randint(0, 61, (n + sum(steps),)) for n in prompt_lens]
    B, T0 = len(seqs), max(prompt_lens)
    cache = model.new_cache(B, T0 + sum(steps))
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]  # (T, V) per row, no cache
        ids = torch.zeros(B, T0, dtype=torch.long)
        for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
            ids[b, :n] = s[:n]
        logits = model(ids, cache, input_lengths=torch.tensor(prompt_lens))
        for b, n in enumerate(prompt_lens):
            torch.testing.assert_close(logits[b, :n], full[b][:n], atol=1e-4, rtol=0)
        pos = list(prompt_lens)
        for k in steps:
            step_ids = torch.stack([s[p : p + k] for s, p in zip(seqs, pos)])
            logits = model(step_ids, cache)
            for b, p in enumerate(pos):
                torch.testing.assert_close(logits[b], full[b][p : p + k], atol=1e-4, rtol=0)
            pos = [p + k for p in pos]
        assert cache.lengths.tolist() == pos
    assert max(f.abs().max() for f in full) > 1.0  # a real signal


def test_absorbed_and_naive_agree_and_differ_in_path():
    """Both paths give the same attention output on the same cached latents (and the absorbed path never calls
    kv_b_proj as a module, i.e. never expands keys/values)."""
    model = make("v3-qlora")
    calls = []
    model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 61, (2, 11))  # a 10-token prefill: longer than ABSORB_MAX_QUERY_LEN
    outs = {}
    for impl in ("naive", "absorb"):
        model.set_decode_impl(impl)
        cache = model.new_cache(2, 11)
        calls.clear()
        with torch.no_grad():
            model(ids[:, :10], cache)
            n_prefill = len(calls)
            outs[impl] = model(ids[:, 10:], cache)
        outs[impl + "_decode_calls"] = len(calls) - n_prefill
        assert n_prefill == 1  # prefill expands (compute-bound path) in both modes
    assert outs["naive_decode_calls"] == 1 and outs["absorb_decode_calls"] == 0
    torch.testing.assert_close(outs["absorb"], outs["naive"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token_formulas(dtype):
    """MLA: (d_c + d_R)·layers·size; MHA: 2·heads·head_dim·layers·size — from the tensors actually allocated."""
    mla, mha, gqa = make("v3-qlora"), make("mha"), make("gqa")
    size = torch.finfo(dtype).bits // 8
    c = mla.config
    cache = mla.new_cache(3, 17, dtype=dtype)
    allocated = sum(t.numel() * t.element_size() for layers in cache.buffers.values() for t in layers)
    assert cache.nbytes == allocated
    assert cache.bytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * size
    assert allocated == 3 * 17 * cache.bytes_per_token()
    cache = mha.new_cache(2, 5, dtype=dtype)
    assert cache.bytes_per_token() == 2 * 4 * 12 * 3 * size
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for layers in cache.buffers.values() for t in layers)
    assert gqa.new_cache(2, 5, dtype=dtype).bytes_per_token() == 2 * 2 * 12 * 3 * size
    assert cache.bytes_per_token() == elements_per_token(mha.config) * size  # the formula == the allocation
    assert mla.new_cache(1, 1, dtype=dtype).bytes_per_token() == elements_per_token(c) * size
    mtp = Transformer(c.replace(num_nextn_predict_layers=1)).new_cache(2, 5, mtp=True, dtype=dtype)
    assert mtp.bytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * 1 * size


def test_v2_dims_cache_fraction():
    """MLA at DeepSeek-V2 dims caches 576 elements per token and layer against MHA's 32,768 (1.76%)."""
    v2 = ModelConfig.preset("deepseek-v2")
    mla = v2.kv_lora_rank + v2.qk_rope_head_dim
    mha = 2 * v2.num_attention_heads * v2.v_head_dim
    assert (mla, mha) == (576, 32768)
    assert elements_per_token(v2) == 576 * 60
    assert elements_per_token(v2.replace(attention_type="mha", head_dim=128)) == 2 * 128 * 128 * 60
    assert elements_per_token(v2) / elements_per_token(v2.replace(attention_type="mha")) < 0.018


def test_select_rows_and_overflow():
    model = make("v3-qlora")
    ids = torch.randint(0, 61, (3, 6))
    cache = model.new_cache(3, 7)
    with torch.no_grad():
        model(ids[:, :5], cache)
        cache.select(torch.tensor([2, 0]))
        got = model(ids[[2, 0], 5:6], cache)[:, -1]
        want = model(ids[[2, 0]])[:, -1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert cache.lengths.tolist() == [6, 6] and cache.buffers["latent"][0].shape[0] == 2
        with pytest.raises(ValueError, match="cache overflow"):
            model(ids[[2, 0], :2], cache)
