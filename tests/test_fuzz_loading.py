"""Fuzzing the loaders: mutated config.json files and damaged checkpoint files give a ValueError or
FileNotFoundError naming the checkpoint (or load, when the mutation is harmless), never another exception."""

import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek import ModelConfig, Transformer
from nanoseek.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

SMALL = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
             first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, vocab_size=64)
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def fresh_model() -> tuple[Transformer, torch.optim.Optimizer]:
    model = Transformer(ModelConfig.preset("tiny", **SMALL))
    return model, torch.optim.AdamW(model.parameters())


@cache
def run_dir() -> Path:
    """A run directory with two checkpoints of a small model, built once per session."""
    root = Path(tempfile.mkdtemp(prefix="nanoseek_fuzz_"))
    model, opt = fresh_model()
    model(torch.randint(0, 64, (2, 5))).sum().backward()
    opt.step()
    for step in (1, 2):
        save_checkpoint(root, step, model, opt, {"rng": None})
    return root


def copy_run() -> Path:
    dst = Path(tempfile.mkdtemp(prefix="nanoseek_fuzz_case_"))
    shutil.copytree(run_dir(), dst, dirs_exist_ok=True)
    return dst


def assert_clear(fn, names: Path) -> None:
    """fn() loads, or fails with ValueError / FileNotFoundError whose message names ``names`` (a path prefix)."""
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        assert str(names) in str(e), f"error does not name {names}: {e}"
    except Exception as e:  # noqa: BLE001 (the point: no other exception type escapes)
        pytest.fail(f"{type(e).__name__} escaped: {e}")


KEYS = sorted(ModelConfig.preset("tiny").to_dict()) + ["rope_parameters", "mlp_bias"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.integers(-2, 5), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta", "original_max_position_embeddings",
                                     "beta_fast", "mscale_all_dim", "attention_factor"]),
                    st.one_of(st.sampled_from(["yarn", "default", "linear"]), st.floats(-2, 50), st.none(),
                              st.text(max_size=3)), max_size=5),
)
EDITS = st.lists(st.one_of(st.tuples(st.just("drop"), st.sampled_from(KEYS)),
                           st.tuples(st.just("set"), st.sampled_from(KEYS), VALUES)), min_size=1, max_size=4)


@FUZZ
@given(edits=EDITS, garbage=st.one_of(st.none(), st.binary(max_size=40), st.integers(0, 2000)))
def test_mutated_config_json(edits, garbage):
    run = copy_run()
    ckpt = run / "checkpoints" / "step_00000002"
    config = ckpt / "config.json"
    d = json.loads(config.read_text())
    for edit in edits:
        if edit[0] == "drop":
            d.pop(edit[1], None)
        else:
            d[edit[1]] = edit[2]
    text = json.dumps(d)  # NaN / Infinity as Python's json writes them
    if isinstance(garbage, bytes):
        config.write_bytes(garbage)
    elif isinstance(garbage, int):
        config.write_text(text[:garbage])  # cut anywhere
    else:
        config.write_text(text)
    assert_clear(lambda: Transformer.from_pretrained(ckpt), ckpt)
    assert_clear(lambda: load_checkpoint(latest_checkpoint(run), fresh_model()[0]), run)
    shutil.rmtree(run)


FILES = ["config.json", "model.safetensors", "state.pt", "optimizer.pt"]
DAMAGE = st.lists(st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("delete"), st.sampled_from(FILES + ["latest"])),
), min_size=1, max_size=3)


@FUZZ
@given(damage=DAMAGE, both=st.booleans())
def test_damaged_checkpoint_files(damage, both):
    run = copy_run()
    steps = sorted((run / "checkpoints").glob("step_*"))
    for target in steps if both else steps[-1:]:
        for kind, name, *args in damage:
            path = target / name if name != "latest" else run / "checkpoints" / "latest"
            if not path.exists():
                continue
            if kind == "delete":
                path.unlink()
                continue
            data = bytearray(path.read_bytes())
            if not data:
                continue
            at = min(int(args[0] * len(data)), len(data) - 1)
            if kind == "truncate":
                del data[at:]
            else:
                data[at] ^= args[1]
            path.write_bytes(bytes(data))
    model, opt = fresh_model()

    def resume():
        ckpt = latest_checkpoint(run)
        if ckpt is not None:
            load_checkpoint(ckpt, model, opt)
            Transformer.from_pretrained(ckpt)

    assert_clear(resume, run)
    shutil.rmtree(run)
