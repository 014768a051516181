"""Test helpers shared across files: random, non-trivial model weights; the collectives of a torchrun worker."""

import inspect

import torch

from nanoseek.policy import Batch


def randomize_(module: torch.nn.Module, seed: int = 1, scale: float = 0.15, biases: bool = True) -> None:
    """Random weights everywhere, norms and (with ``biases``) MoE correction biases included, so outputs differ
    strongly across tokens and no code path hides behind zeros or ones: norm weights 1 + 0.3·N(0, 1), correction
    biases 0.1·N(0, 1), everything else ``scale``·N(0, 1). RoPE tables and integer buffers are left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if "inv_freq" in name or not t.is_floating_point() or (
                    not biases and name.endswith("e_score_correction_bias")):
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * noise)
            elif t.dim() == 1:
                t.copy_(1 + 0.3 * noise)
            else:
                t.copy_(scale * noise)


def batch_from_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """One row per (prompt, completion) pair; identical prompts become one group."""
    index: dict[tuple[int, ...], int] = {}
    prompt_index = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return Batch.build([list(p) for p in index], prompt_index, completions, pad_id)


# Every collective a torchrun worker issues (its own, DDP's and FSDP's), from torch's flight recorder: run the worker
# with FLIGHT_RECORDER_ENV, end its script with DUMP_COLLECTIVES and a call of dump_collectives(path); then
# same_collectives() compares the ranks.
FLIGHT_RECORDER_ENTRIES = 100_000  # the recorder keeps the last N; the 2-rank test runs issue a few hundred
FLIGHT_RECORDER_ENV = {"TORCH_FR_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES)}


def dump_collectives(path) -> None:
    """Write [name, input sizes, input dtypes, output sizes, output dtypes] of each collective this process issued."""
    import json

    from torch._C._distributed_c10d import _dump_fr_trace_json

    keys = ("profiling_name", "input_sizes", "input_dtypes", "output_sizes", "output_dtypes")
    entries = json.loads(_dump_fr_trace_json(True, False)).get("entries", [])  # no key when nothing was recorded
    with open(path, "w") as f:
        json.dump([[e[k] for k in keys] for e in entries], f)


DUMP_COLLECTIVES = "\n" + inspect.getsource(dump_collectives)  # for torchrun scripts


def same_collectives(path0, path1) -> list:
    """The collectives both ranks issued, asserting they are the same ones in the same order with the same shapes and
    dtypes (a collective inside a rank-local branch makes gloo abort on a size mismatch, or hang)."""
    import json
    from pathlib import Path

    def comparable(call: list) -> list:  # a scatter's input and a gather's output exist on the root rank only
        name, *io = call
        return [name, *(io[2:] if name == "gloo:scatter" else io[:2] if name == "gloo:gather" else io)]

    c0, c1 = ([comparable(c) for c in json.loads(Path(p).read_text())] for p in (path0, path1))
    first_difference = next(((i, a, b) for i, (a, b) in enumerate(zip(c0 + [None], c1 + [None])) if a != b), None)
    assert first_difference is None, f"rank 0 and rank 1 differ at collective #{first_difference}"
    assert 0 < len(c0) < FLIGHT_RECORDER_ENTRIES
    return c0
