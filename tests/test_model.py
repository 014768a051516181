import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.attention import AttentionContext


def test_forward_shapes_and_mtp():
    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=2)).eval()
    ids = torch.randint(0, 256, (2, 12))
    logits, mtp = model(ids, return_mtp=True)
    assert logits.shape == (2, 12, 256)
    assert [t.shape for t in mtp] == [(2, 11, 256), (2, 10, 256)]
    torch.testing.assert_close(logits, model(ids))
    hidden = model(ids, return_hidden=True)
    torch.testing.assert_close(model.lm_head(hidden), logits)


@pytest.mark.parametrize("attention_type,kv_heads", [("mla", None), ("mha", None), ("mha", 2)])
def test_causality(attention_type, kv_heads):
    """Logits at position i never depend on tokens after i; MTP depth-1 row i sees tokens up to i+1."""
    model = Transformer(ModelConfig.preset("tiny", attention_type=attention_type,
                                           num_key_value_heads=kv_heads)).eval()
    ids = torch.randint(0, 256, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 256
    with torch.no_grad():
        a, (ma,) = model(ids, return_mtp=True)
        b, (mb,) = model(changed, return_mtp=True)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    torch.testing.assert_close(ma[:, :5], mb[:, :5])  # row i uses h_i and Emb(t_{i+1})
    assert not torch.allclose(ma[:, 5], mb[:, 5])


def test_mtp_matches_manual_chain():
    model = Transformer(ModelConfig.preset("tiny")).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        _, (mtp,) = model(ids, return_mtp=True)
        h = model(ids, return_hidden=True)
        m = model.mtp[0]
        x = m.eh_proj(torch.cat((m.enorm(model.embed_tokens(ids[:, 1:])), m.hnorm(h[:, :-1])), dim=-1))
        x = m.block(x, model.context(8, None, x.dtype))
        torch.testing.assert_close(mtp, model.lm_head(m.norm(x)))


def test_mha_baseline_has_plain_projections():
    model = Transformer(ModelConfig.preset("tiny", attention_type="mha", num_key_value_heads=2))
    attn = model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * model.config.head_dim


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mha_and_gqa_equal_a_hand_written_llama_attention_in_float64(kv_heads):
    """q, k, v projections, RoPE on the whole head (rotate-half), K/V heads shared by H/KV query heads, causal
    softmax(q·k/√d)·v, output projection: written out here with einsum."""
    cfg = ModelConfig.preset("tiny", attention_type="mha", num_key_value_heads=kv_heads, head_dim=16)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    attn, (B, T), (H, d) = model.layers[0].self_attn, (2, 7), (cfg.num_attention_heads, cfg.head_dim)
    x, positions = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64), torch.arange(T)
    cos, sin = model.rotary(positions, torch.float64)
    out = attn(x, AttentionContext(cos=cos, sin=sin), 0)
    angles = positions[:, None].double() / cfg.rope_theta ** (torch.arange(0, d, 2).double() / d)
    cos2, sin2 = (torch.cat([f(angles)] * 2, -1)[None, :, None] for f in (torch.cos, torch.sin))

    def rope(t):
        return t * cos2 + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin2

    q = rope(attn.q_proj(x).view(B, T, H, d))
    k = rope(attn.k_proj(x).view(B, T, kv_heads, d)).repeat_interleave(H // kv_heads, 2)
    v = attn.v_proj(x).view(B, T, kv_heads, d).repeat_interleave(H // kv_heads, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / d**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.o_proj(torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * d))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


def test_checkpoint_round_trip_keeps_mtp_and_bias(tmp_path):
    model = Transformer(ModelConfig.preset("tiny"))
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b)


def test_sharded_checkpoint(tmp_path):
    model = Transformer(ModelConfig.preset("tiny")).eval()
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(tmp_path).eval()(ids), model(ids))
    model.save_pretrained(tmp_path)  # re-saving unsharded removes the stale shards
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def _corrupt(tmp_path, fn):
    from safetensors.torch import load_file, save_file

    Transformer(ModelConfig.preset("tiny")).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    fn(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


def test_missing_unexpected_misshaped_tensors_are_listed(tmp_path):
    def corrupt(t):
        del t["model.layers.0.self_attn.kv_b_proj.weight"]
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        t["model.norm.weight"] = torch.zeros(3)

    _corrupt(tmp_path, corrupt)
    with pytest.raises(ValueError) as err:
        Transformer.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing: layers.0.self_attn.kv_b_proj.weight" in msg
    assert "unexpected: layers.0.self_attn.extra.weight" in msg
    assert "norm.weight: checkpoint (3,) vs model (64,)" in msg


def test_from_pretrained_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)


def test_bf16_forward_runs():
    model = Transformer(ModelConfig.preset("tiny")).to(torch.bfloat16).eval()
    out = model(torch.randint(0, 256, (2, 5)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_tied_embeddings_round_trip(tmp_path):
    model = Transformer(ModelConfig.preset("tiny", tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is back.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
