"""Hugging Face interop: read and write ``deepseek_v2`` / ``deepseek_v3`` checkpoints under their own names.

nanoseek's module tree uses the Hugging Face names already, with two differences handled here:
- routed experts are stacked (``mlp.experts.gate_proj: (E, I, D)``) where the checkpoint has one tensor per
  expert (``mlp.experts.{e}.gate_proj.weight``);
- MTP module k lives at ``model.layers.{L+k}`` in the released V3 weights (``enorm``, ``hnorm``, ``eh_proj``,
  the block, ``shared_head.norm``, and copies of the shared ``embed_tokens`` / ``shared_head.head``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig

EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FP32_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # the router stays float32


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> Hugging Face names (experts unstacked, MTP at layer L+k with shared copies)."""
    L = model.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if m := re.match(r"^mtp\.(\d+)\.(.*)$", name):
            k, rest = int(m[1]), m[2]
            rest = rest.removeprefix("block.")
            if rest == "norm.weight":
                rest = "shared_head.norm.weight"
            name = f"layers.{L + k}.{rest}"
        if name == "lm_head.weight":
            out[name] = t
            continue
        name = "model." + name
        if m := _STACKED.match(name):
            for e in range(t.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = t[e]
        else:
            out[name] = t
    for k in range(model.config.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = model.embed_tokens.weight
        out[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names -> nanoseek names (the inverse of ``to_hf_state_dict``); MTP copies are dropped."""
    L = config.num_hidden_layers
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if m := _PER_EXPERT.match(name):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
            continue
        out[name] = t
    for (prefix, kind), by_id in experts.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise ValueError(f"checkpoint experts under {prefix} are not numbered 0..E-1: {ids[:8]}...")
        out[f"{prefix}.{kind}"] = torch.stack([by_id[e] for e in ids])
    renamed = {}
    for name, t in out.items():
        if name != "lm_head.weight":
            name = name.removeprefix("model.")
        if m := re.match(r"^layers\.(\d+)\.(.*)$", name):
            idx, rest = int(m[1]), m[2]
            if idx >= L:
                k = idx - L
                if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                    continue  # copies of the shared embedding / head
                if rest == "shared_head.norm.weight":
                    name = f"mtp.{k}.norm.weight"
                elif rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
                    name = f"mtp.{k}.{rest}"
                else:
                    name = f"mtp.{k}.block.{rest}"
        renamed[name] = t
    if config.tie_word_embeddings:
        renamed.pop("lm_head.weight", None)
    return renamed


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{directory}: no model.safetensors or model.safetensors.index.json (is this a checkpoint directory?)"
        )
    tensors = {}
    for f in files:
        with safe_open(str(directory / f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[k] = fh.get_tensor(k)
    return tensors


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None):
    from nanoseek.model.rope import RotaryEmbedding
    from nanoseek.model.transformer import Transformer

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: from_pretrained needs a checkpoint directory")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") not in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(
            f"{config_file}: model_type {raw.get('model_type')!r} is not deepseek_v2/deepseek_v3; "
            "for other Hugging Face causal LMs use transformers.AutoModelForCausalLM"
        )
    config = ModelConfig.from_dict(raw)
    state = from_hf_state_dict(_read_safetensors(directory), config)
    if config.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        # transformers drops the MTP module when it saves; load the main model without it
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError(f"checkpoint {directory} does not match its config.json: " + "; ".join(parts))
    target = dtype or torch.float32
    for k, v in state.items():
        keep_fp32 = k.endswith(FP32_TENSORS) or not v.is_floating_point()
        state[k] = v.to(torch.float32 if keep_fp32 else target)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary = RotaryEmbedding(config)  # the RoPE table is not in the state dict: build it off the meta device
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_pretrained(model, directory: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or shards + index), each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    # a shared storage (MTP copies of embed/head) must be written as separate tensors
    tensors = {k: v.clone() if k.endswith(("embed_tokens.weight", "shared_head.head.weight")) else v
               for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    stale = set(directory.glob("model*.safetensors*"))
    if len(shards) == 1:
        _atomic_save(shards[0], directory / "model.safetensors")
        stale.discard(directory / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, directory / fname)
            weight_map.update(dict.fromkeys(shard, fname))
            stale.discard(directory / fname)
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write_text(json.dumps(index, indent=2, sort_keys=True), directory / "model.safetensors.index.json")
        stale.discard(directory / "model.safetensors.index.json")
    for old in stale:  # files of an earlier save with another sharding, removed once the new ones exist
        old.unlink()
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    _atomic_write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", directory / "config.json")
