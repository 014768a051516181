"""Model configuration, with the field names and meanings of Hugging Face ``DeepseekV3Config`` / ``DeepseekV2Config``
so that a checkpoint's ``config.json`` round-trips; ``attention_type`` and ``head_dim`` (an MHA/GQA baseline of the
same width) are nanoseek's own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.cli_args import check_ranges, option

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ROPE_TYPES = ("default", "yarn")
# transformers' defaults where they differ from nanoseek's (a config.json may leave these out)
HF_DEFAULTS = {
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
}
YARN_LOWEST = {"factor": 1, "original_max_position_embeddings": 1, "beta_fast": 0, "beta_slow": 0, "mscale": 0,
               "mscale_all_dim": 0, "attention_factor": 0}  # the smallest value each YaRN key may take


@dataclass
class ModelConfig:
    """Each field declares its type and range (``option``); ``validate`` checks them, then the rules between fields."""

    model_type: str = option("deepseek_v3", choices=MODEL_TYPES)
    vocab_size: int = option(256, min=1)
    hidden_size: int = option(64, min=1)
    intermediate_size: int = option(128, "dense FFN width (first_k_dense_replace layers)", min=1)
    moe_intermediate_size: int = option(32, "width of one routed/shared expert", min=1)
    num_hidden_layers: int = option(2, min=1)
    num_attention_heads: int = option(4, min=1)
    num_key_value_heads: int | None = option(None, "MHA/GQA baseline only; null = num_attention_heads", min=1)
    # MLA (V2 §2.1.2-2.1.3): d_c = kv_lora_rank, d_c' = q_lora_rank, d_h = qk_nope_head_dim, d_R = qk_rope_head_dim
    q_lora_rank: int | None = option(32, "null for a plain q projection", min=1)
    kv_lora_rank: int = option(32, min=1)
    qk_nope_head_dim: int = option(16, min=0)
    qk_rope_head_dim: int = option(8, "even: RoPE rotates channel pairs", min=1)
    v_head_dim: int = option(16, min=1)
    # DeepSeekMoE (V2 §2.2, V3 §2.1.2)
    n_routed_experts: int | None = option(8, "null or 0: every layer is dense", min=0)
    n_shared_experts: int = option(1, min=0)
    num_experts_per_tok: int = option(2, min=1)
    n_group: int = option(1, min=1)
    topk_group: int = option(1, min=1)
    routed_scaling_factor: float = option(1.0, gt=0)
    norm_topk_prob: bool = True
    scoring_func: str = option("sigmoid", choices=("softmax", "sigmoid"))
    topk_method: str = option("noaux_tc", choices=("greedy", "group_limited_greedy", "noaux_tc"))
    first_k_dense_replace: int = option(1, min=0)
    aux_loss_alpha: float = option(1e-4, "sequence-wise balance-loss weight (V3 §2.1.2); α = 0.0001 (§4.2)", min=0)
    # MTP (V3 §2.2)
    num_nextn_predict_layers: int = option(0, min=0)
    # the rest of the block
    hidden_act: str = option("silu", "SwiGLU experts", choices=("silu",))
    max_position_embeddings: int = option(512, min=1)
    rms_norm_eps: float = option(1e-6, gt=0)
    rope_theta: float = option(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = None  # checked by _check_rope_scaling
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = option(0.0, "a probability below 1", min=0)
    tie_word_embeddings: bool = False
    initializer_range: float = option(0.02, min=0)
    bos_token_id: int | None = option(None, min=0)
    eos_token_id: int | None = option(None, min=0)
    pad_token_id: int | None = option(None, min=0)
    # nanoseek's own
    attention_type: str = option("mla", "mha: the MHA/GQA baseline", choices=("mla", "mha"))
    head_dim: int | None = option(None, "MHA/GQA baseline head size; null = v_head_dim", min=1)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown config.json keys, kept verbatim

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None or self.attention_type == "mla":
            self.num_key_value_heads = self.num_attention_heads  # MLA has no KV-head count (every head its own)
        if self.head_dim is None:
            self.head_dim = self.v_head_dim
        self.n_routed_experts = self.n_routed_experts or 0  # null: every layer is dense
        if self.model_type == "deepseek_v2":
            self.rope_interleave = True  # V2 applies RoPE to interleaved channel pairs
        self.validate()

    @property
    def rope_dim(self) -> int:
        """Channels that carry RoPE: d_R for MLA, the whole head for the MHA baseline."""
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_R), times YaRN's mscale(s, mscale_all_dim)^2 (what transformers and V3 do)."""
        head = self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim
        scale = head**-0.5
        rs = self.rope_scaling
        if rs and rs.get("rope_type", rs.get("type")) == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def validate(self) -> None:
        """ValueError naming the field, its value and the rule: declared types and ranges, then cross-field rules."""
        for name, hint in typing.get_type_hints(ModelConfig).items():
            value = getattr(self, name)
            if name != "extra" and not _has_type(value, hint):
                raise ValueError(f"invalid ModelConfig.{name}={value!r}: must be {_type_name(hint)}")
        check_ranges(self, label=lambda name, value: f"invalid ModelConfig.{name}={value!r}")
        experts, mha = self.n_routed_experts, self.attention_type == "mha"
        per_group = experts // self.n_group
        pairs = "must be even (RoPE rotates channel pairs)"
        rules = [
            ("attention_dropout", self.attention_dropout < 1, "must be < 1"),
            ("qk_rope_head_dim", self.qk_rope_head_dim % 2 == 0, pairs),
            ("head_dim", not mha or self.head_dim % 2 == 0, pairs),
            ("num_key_value_heads", not mha or self.num_attention_heads % self.num_key_value_heads == 0,
             f"must divide num_attention_heads={self.num_attention_heads}"),
        ]
        if experts:
            v2, v3 = self.model_type == "deepseek_v2", self.model_type == "deepseek_v3"
            rules += [
                ("num_experts_per_tok", self.num_experts_per_tok <= experts, f"must be <= n_routed_experts={experts}"),
                ("n_group", experts % self.n_group == 0, f"must divide n_routed_experts={experts}"),
                ("topk_group", self.topk_group <= self.n_group, f"must be <= n_group={self.n_group}"),
                ("num_experts_per_tok",
                 self.topk_method == "greedy" or self.num_experts_per_tok <= self.topk_group * per_group,
                 "must be <= topk_group * (n_routed_experts / n_group)"),
                ("n_group", self.topk_method != "noaux_tc" or per_group >= 2,
                 "noaux_tc scores a group by its top-2 experts: each group needs >= 2 experts"),
                ("scoring_func", not v3 or (self.scoring_func, self.topk_method) == ("sigmoid", "noaux_tc"),
                 "deepseek_v3 uses scoring_func='sigmoid' with topk_method='noaux_tc'"),
                ("scoring_func", not v2 or self.scoring_func == "softmax", "deepseek_v2 uses scoring_func='softmax'"),
                ("topk_method", not v2 or self.topk_method != "noaux_tc",
                 "deepseek_v2 uses 'greedy' or 'group_limited_greedy'"),
            ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"invalid ModelConfig.{name}={getattr(self, name)!r}: {rule}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face-style config.json dictionary."""
        d = {**self.extra, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}}
        if self.attention_type == "mla":
            del d["head_dim"]  # transformers derives head_dim (= qk_rope_head_dim) itself for MLA
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        if self.model_type == "deepseek_v3":
            d["num_local_experts"] = self.n_routed_experts
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> ModelConfig:
        """Build from a config.json dictionary (HF v4 ``rope_scaling`` or v5 ``rope_parameters``). Unknown keys are
        kept in ``extra`` (a Hugging Face config carries many); with ``strict=True`` they raise, naming the key."""
        if not isinstance(d, dict):
            raise ValueError(f"a config.json must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        for name in ("rope_parameters", "rope_scaling"):
            if d.get(name) is not None and not isinstance(d[name], dict):
                raise ValueError(f"invalid ModelConfig.{name}={d[name]!r}: must be an object or null")
        if d.get("mlp_bias"):
            raise ValueError(f"invalid mlp_bias={d['mlp_bias']!r}: nanoseek's FFNs have no bias (use false)")
        params = d.pop("rope_parameters", None) or {}
        d.setdefault("rope_theta", params.get("rope_theta", 10000.0))
        rope = {k: v for k, v in (d.get("rope_scaling") or params).items() if k != "rope_theta"}
        kind = rope.get("rope_type", rope.get("type"))
        d["rope_scaling"] = None if kind in ("default", None) else {**rope, "rope_type": kind}
        if d.get("model_type") == "deepseek_v3" and "num_mtp_layers" in d:
            d.setdefault("num_nextn_predict_layers", d["num_mtp_layers"])
        d = {**HF_DEFAULTS.get(d.get("model_type"), {}), **d}
        if isinstance(d.get("eos_token_id"), list) and d["eos_token_id"]:
            d["eos_token_id"] = d["eos_token_id"][0]
        d.update({name: 1 for name in ("n_group", "topk_group") if name in d and d[name] is None})  # null: no groups
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = {k: v for k, v in d.items() if k not in known}
        if strict and unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"unknown ModelConfig field(s): {names}; valid fields: {', '.join(sorted(known))}")
        for k in ("architectures", "num_local_experts", "num_mtp_layers", "transformers_version", "dtype",
                  "torch_dtype", "use_cache", "auto_map", "qk_head_dim"):  # written by transformers or derived
            unknown.pop(k, None)
        return cls(**{k: v for k, v in d.items() if k in known}, extra=unknown)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """A checkpoint's config.json, stating every field that changes the computation (``required_fields``)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"a config.json must be a JSON object, got {type(raw).__name__}")
            if raw.get("model_type") not in MODEL_TYPES:
                raise ValueError(f"model_type {raw.get('model_type')!r} is not one of {MODEL_TYPES}; for other "
                                 "Hugging Face causal LMs use transformers.AutoModelForCausalLM")
            missing = [name for name in required_fields(raw) if name not in raw]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}; they change the computation, so a "
                                 "checkpoint's config.json must state them (no default is assumed)")
            return cls.from_dict(raw)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: a checkpoint directory needs its config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        except (OSError, ValueError) as e:  # unreadable, or a field at fault
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Named shapes: ``tiny`` (tests), ``small`` (the demo), and the published DeepSeek shapes."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def required_fields(raw: dict[str, Any]) -> list[str]:
    """Fields a checkpoint's config.json must hold: those whose defaults differ between nanoseek and
    transformers' DeepseekV2/V3 configs, or that decide shapes or routing."""
    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps",
             "n_routed_experts"]
    if raw.get("attention_type") == "mha":
        names += ["num_key_value_heads", "head_dim"]
    if raw.get("n_routed_experts"):
        names += ["num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
                  "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group"]
        if raw.get("model_type") == "deepseek_v2":
            names.append("topk_method")  # V3 implies noaux_tc
    return names


def _check_rope_scaling(rs: dict[str, Any]) -> None:
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"invalid ModelConfig.rope_scaling type {kind!r}: must be one of {ROPE_TYPES}")
    if kind != "yarn":
        return
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ValueError(f"invalid ModelConfig.rope_scaling: YaRN needs {key!r}")
    for key, lowest in YARN_LOWEST.items():
        value = rs.get(key)
        if value is not None and (not _has_type(value, float) or value < lowest):
            raise ValueError(f"invalid ModelConfig.rope_scaling[{key!r}]={value!r}: YaRN needs a finite number >= "
                             f"{lowest}")


def _has_type(value: Any, hint: Any) -> bool:
    """isinstance for the annotations ModelConfig uses; bools are not numbers, floats must be finite."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, typing.get_origin(hint) or hint) and (hint is bool or not isinstance(value, bool))


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             type(None): "null", dict: "an object"}
    parts = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    return " or ".join(names.get(typing.get_origin(h) or h, str(h)) for h in parts)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-scale correction sqrt(t) = 0.1·mscale·ln(s) + 1 (V2 §B / V3 §4.3)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# the published models' YaRN context extension, 4K -> 160K (V2 §B, V3 §4.3), and their MLA shape
_YARN = dict(rope_type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
_MLA = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840)
_V2 = dict(_MLA, model_type="deepseek_v2", vocab_size=102400, n_shared_experts=2, num_experts_per_tok=6,
           norm_topk_prob=False, scoring_func="softmax", first_k_dense_replace=1,
           rope_scaling={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707})
PRESETS: dict[str, dict[str, Any]] = {
    # tiny (tests): the field defaults, with two expert groups and one MTP module
    "tiny": dict(n_group=2, num_nextn_predict_layers=1, max_position_embeddings=256),
    "small": dict(vocab_size=256, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=6, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  n_group=2, topk_group=2, first_k_dense_replace=1, num_nextn_predict_layers=1),
    # DeepSeek-V2-Lite (16B, 2.4B active): no query compression, 64 routed experts, greedy softmax gate
    "deepseek-v2-lite": dict(_V2, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, n_routed_experts=64,
                             n_group=1, topk_group=1, routed_scaling_factor=1.0, topk_method="greedy"),
    # DeepSeek-V2 (236B, 21B active)
    "deepseek-v2": dict(_V2, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160,
                        n_group=8, topk_group=3, routed_scaling_factor=16.0, topk_method="group_limited_greedy"),
    # DeepSeek-V3 (671B, 37B active), one MTP module
    "deepseek-v3": dict(_MLA, model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
                        first_k_dense_replace=3, num_nextn_predict_layers=1,
                        rope_scaling={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
