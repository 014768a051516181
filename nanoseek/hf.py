"""Hugging Face interop on state dicts (the model class is not imported here): names both ways, sharded
safetensors reading and writing, atomic file writes. nanoseek's module tree uses the Hugging Face names, but for:
- routed experts, stacked (``mlp.experts.gate_proj: (E, I, D)``) where the checkpoint has one tensor per expert
  (``mlp.experts.{e}.gate_proj.weight``);
- MTP module k, at ``model.layers.{L+k}`` in the released V3 weights, with copies of the shared embedding and head.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig

_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# MTP module k: nanoseek's ``mtp.{k}.<ours>...`` is the checkpoint's ``model.layers.{L+k}.<theirs>...``; the last
# pair is the block, whose parameters are the layer's own
_MTP_NAMES = (("norm.weight", "shared_head.norm.weight"), ("enorm.", "enorm."), ("hnorm.", "hnorm."),
              ("eh_proj.", "eh_proj."), ("block.", ""))
FP32_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # the router stays float32


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> Hugging Face names (experts unstacked, MTP at layer L+k with shared copies)."""
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if m := re.match(r"^mtp\.(\d+)\.(.*)$", name):
            rest = next(theirs + m[2].removeprefix(ours) for ours, theirs in _MTP_NAMES if m[2].startswith(ours))
            name = f"layers.{L + int(m[1])}.{rest}"
        name = name if name == "lm_head.weight" else "model." + name
        if m := _STACKED.match(name):
            for e in range(t.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.weight"] = t[e]
        else:
            out[name] = t
    for k in range(config.num_nextn_predict_layers):  # copies, not views: safetensors stores no shared tensors
        out[f"model.layers.{L + k}.embed_tokens.weight"] = state["embed_tokens.weight"].clone()
        out[f"model.layers.{L + k}.shared_head.head.weight"] = state["lm_head.weight"].clone()
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in out.items()}


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards its index names)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
        if not all(isinstance(n, str) and n and "/" not in n for n in names):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names in {directory}")
        return [directory / n for n in names]
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json (is this a "
                            "checkpoint directory?)")


def read_state_dict(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A checkpoint directory's weights under nanoseek's names (``to_hf_state_dict`` inverted; MTP copies dropped)."""
    L = config.num_hidden_layers
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in read_safetensors(directory).items():
        name = name.removeprefix("model.")
        if (m := re.match(r"^layers\.(\d+)\.(.*)$", name)) and int(m[1]) >= L:
            if m[2] in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the shared embedding / head
            rest = next(ours + m[2].removeprefix(theirs) for ours, theirs in _MTP_NAMES if m[2].startswith(theirs))
            name = f"mtp.{int(m[1]) - L}.{rest}"
        if m := _PER_EXPERT.match(name):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
        else:
            out[name] = t
    for (prefix, kind), by_id in experts.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))):
            raise ValueError(f"{directory}: checkpoint experts under {prefix} are not numbered 0..E-1: {ids[:8]}...")
        if len({by_id[e].shape for e in ids}) > 1:
            raise ValueError(f"{directory}: checkpoint experts under {prefix}.*.{kind} differ in shape: "
                             f"{sorted({tuple(by_id[e].shape) for e in ids})}")
        out[f"{prefix}.{kind}"] = torch.stack([by_id[e] for e in ids])
    if config.tie_word_embeddings and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]  # stored once, as the embedding
    return out


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory under its stored names."""
    tensors = {}
    for f in weight_files(directory):
        with open_safetensors(f) as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return tensors


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open`` (reads the header only), with a missing, truncated or corrupt file named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint's weights are incomplete")
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except SafetensorError as e:
        raise ValueError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise naming every missing, unexpected and mis-shaped tensor of ``state`` against the model's ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    parts = [f"{len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
             for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
    if parts:
        raise ValueError(f"checkpoint {source} does not match the model: " + "; ".join(parts))


def atomic_write(path: Path, data: str | Callable[[str], None]) -> None:
    """Write ``data`` (text, or a function writing the path it is given) to a temp file beside ``path``, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if isinstance(data, str):
            Path(tmp).write_text(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_pretrained(state: dict[str, torch.Tensor], config: ModelConfig, directory: str | Path,
                     max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write a state dict as ``config.json`` + ``model.safetensors`` (or shards + index), HF names, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(state, config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        if shards[-1] and size + tensors[k].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += tensors[k].nbytes
    stale = set(directory.glob("model*.safetensors*"))
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, shard in zip(names, shards):
        atomic_write(directory / name, partial(save_file, shard, metadata={"format": "pt"}))
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
        names.append("model.safetensors.index.json")
        atomic_write(directory / names[-1], json.dumps(index, indent=2, sort_keys=True))
    for old in stale - {directory / name for name in names}:  # an earlier save's other sharding, once the new exists
        old.unlink()
    dtype = str(state["embed_tokens.weight"].dtype).removeprefix("torch.")  # the weights' dtype, for transformers
    atomic_write(directory / "config.json",
                 json.dumps({**config.to_dict(), "torch_dtype": dtype}, indent=2, sort_keys=True) + "\n")
