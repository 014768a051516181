import json

import pytest

from nanoseek import ModelConfig, Transformer

BAD = [
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-4), "q_lora_rank"),
    (dict(attention_type="mha", num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(rope_scaling={"rope_type": "dynamic-ntk", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="noaux_tc"), "topk_method"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(hidden_size=-1), "hidden_size"),
]


@pytest.mark.parametrize("overrides,field", BAD)
def test_invalid_config_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("tiny", **overrides)


def test_round_trip_through_config_json(tmp_path):
    cfg = ModelConfig.preset("small", rope_scaling=dict(rope_type="yarn", factor=8.0,
                                                        original_max_position_embeddings=64, mscale=1.0,
                                                        mscale_all_dim=1.0))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    back = ModelConfig.load(tmp_path / "config.json")
    assert back == cfg


def test_reads_transformers_v5_rope_parameters():
    d = ModelConfig.preset("tiny").to_dict()
    d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0,
                            "original_max_position_embeddings": 128}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["factor"] == 2.0


def test_strict_rejects_unknown_keys():
    d = ModelConfig.preset("tiny").to_dict()
    d["hiden_size"] = 12
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict(d, strict=True)
    assert ModelConfig.from_dict(d).extra["hiden_size"] == 12  # lenient by default, kept verbatim


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("deepseek-v9")


@pytest.mark.parametrize(
    "preset,total,active",
    [("deepseek-v3", 671e9, 37e9), ("deepseek-v2", 236e9, 21e9)],
)
def test_published_shapes_parameter_counts(preset, total, active):
    """The papers' headline sizes (V3: 671B/37B, V2: 236B/21B), counted on the meta device."""
    import torch

    with torch.device("meta"):
        model = Transformer(ModelConfig.preset(preset))
    assert abs(model.num_parameters() / total - 1) < 0.01
    assert abs(model.num_active_parameters() / active - 1) < 0.03


def test_hf_config_json_fields(tmp_path):
    """config.json carries the Hugging Face field names transformers reads."""
    Transformer(ModelConfig.preset("tiny")).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "num_nextn_predict_layers",
                "rope_interleave", "model_type"):
        assert key in d
    assert "head_dim" not in d  # MLA: transformers derives it


_DROP = object()


def _saved(tmp_path, **changes):
    d = ModelConfig.preset("tiny").to_dict()
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("field", ["num_experts_per_tok", "n_group", "routed_scaling_factor", "norm_topk_prob",
                                   "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "n_routed_experts"])
def test_checkpoint_config_missing_field_is_an_error(tmp_path, field):
    path = _saved(tmp_path, **{field: _DROP})
    with pytest.raises(ValueError, match=rf"{path}: missing field\(s\) {field}\b"):
        ModelConfig.load(path)


@pytest.mark.parametrize("field,value", [
    ("rope_theta", float("nan")), ("rope_theta", 0), ("rope_theta", -5.0), ("rope_theta", "big"),
    ("hidden_size", -64), ("hidden_size", 64.0), ("hidden_size", True), ("num_experts_per_tok", "2"),
    ("norm_topk_prob", 1), ("rms_norm_eps", 0.0), ("routed_scaling_factor", float("inf")),
    ("n_shared_experts", -1), ("qk_nope_head_dim", -8), ("vocab_size", None), ("rope_scaling", [1, 2]),
    ("rope_scaling", {"rope_type": "yarn", "factor": "x", "original_max_position_embeddings": 64}),
    ("attention_dropout", 1.5), ("eos_token_id", -3), ("tie_word_embeddings", "no"), ("mlp_bias", True),
])
def test_checkpoint_config_bad_value_names_file_field_value(tmp_path, field, value):
    path = _saved(tmp_path, **{field: value})
    with pytest.raises(ValueError) as err:
        ModelConfig.load(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg
    if field != "rope_scaling":
        assert repr(value) in msg


def test_checkpoint_config_not_json_or_not_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "deepseek_v3",\n  "hidden_size": 6')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        ModelConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path}: a config.json must be a JSON object"):
        ModelConfig.load(path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        ModelConfig.load(tmp_path / "nothing.json")


def test_null_groups_mean_one_and_mla_ignores_kv_heads(tmp_path):
    cfg = ModelConfig.load(_saved(tmp_path, n_group=None, topk_group=None, num_key_value_heads=128))
    assert (cfg.n_group, cfg.topk_group, cfg.num_key_value_heads) == (1, 1, cfg.num_attention_heads)


def test_user_json_keeps_defaults_and_presets():
    """A user config (``from_dict``) may leave fields out; only checkpoints must state them."""
    cfg = ModelConfig.from_dict({"hidden_size": 96, "num_experts_per_tok": 3}, strict=True)
    assert cfg.hidden_size == 96 and cfg.num_experts_per_tok == 3 and cfg.n_routed_experts == 8
    assert ModelConfig.preset("small").rope_theta == 10000.0


def test_declared_ranges_are_checked_and_named_with_the_fix():
    """Every field's declared ``min`` / ``gt`` / ``choices`` is enforced; the message names the field, the value
    and the rule, with the field's help where it has one."""
    import dataclasses

    for f in dataclasses.fields(ModelConfig):
        m = f.metadata
        if not m:
            continue
        bad = ("nope" if m["choices"] is not None else m["min"] - 1 if m["min"] is not None
               else m["gt"] if m["gt"] is not None else None)
        if bad is None:
            continue
        bad = float(bad) if f.type == "float" else bad
        mha = {"attention_type": "mha"} if f.name == "num_key_value_heads" else {}  # MLA ignores the KV-head count
        with pytest.raises(ValueError, match=rf"ModelConfig\.{f.name}={bad!r}: must be") as err:
            ModelConfig.preset("tiny", **mha, **{f.name: bad})
        assert m["help"] in str(err.value)
    with pytest.raises(ValueError, match=r"q_lora_rank=-4: must be >= 1 \(null for a plain q projection\)"):
        ModelConfig.preset("tiny", q_lora_rank=-4)


def test_deepseek_v2_rotates_interleaved_pairs():
    cfg = ModelConfig(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", rope_interleave=False)
    assert cfg.rope_interleave is True
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
