"""torchrun scale-out: 2 CPU processes (gloo) give the 1-process loss curve for the same global batch, and
every rank applies the same expert-bias update."""

import json
import os
import subprocess
import sys

import pytest
import torch
from builders import DUMP_COLLECTIVES, FLIGHT_RECORDER_ENV, same_collectives

SCRIPT = DUMP_COLLECTIVES + """
import os, sys, torch
from nanoseek.train import pretrain
from nanoseek.cli_args import run_command
out, mode = sys.argv[1], sys.argv[2]
cfg = pretrain.TrainConfig(steps=5, batch_size=8, grad_accum=2, seq_len=24, lr=3e-3, warmup_steps=2, bias_gamma=0.01,
                           out=out, progress=False, dist_mode=mode)
model_holder = {}
orig = pretrain.wrap_model
def grab(model, *a, **k):
    model_holder["m"] = model
    return orig(model, *a, **k)
pretrain.wrap_model = grab
assert run_command(pretrain.train, cfg) == 0  # what `nanoseek pretrain` runs: train, then leave the process group
rank = int(os.environ.get("RANK", "0"))
biases = [m.gate.e_score_correction_bias.clone() for m in model_holder["m"].moe_layers()]
torch.save(biases, f"{out}/bias_rank{rank}.pt")
dump_collectives(f"{out}/collectives_rank{rank}.json")
"""


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(tmp_path, nproc, mode, name):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(script), str(out), mode] if nproc > 1 else [sys.executable, str(script), str(out), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **FLIGHT_RECORDER_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_torchrun_two_processes_match_one(tmp_path):
    """Same global batch (8, with 2 accumulation micro-batches per rank): DDP and FSDP2 on 2 ranks vs 1 process."""
    one = launch(tmp_path, 1, "ddp", "one")
    l1 = losses(one)
    assert len(l1) == 5 and l1[-1] < l1[0]
    for mode in ("ddp", "fsdp"):
        two = launch(tmp_path, 2, mode, mode)
        l2 = losses(two)
        assert len(l2) == 5
        # FSDP2 gathers and reduce-scatters in its own order: fp32 rounding differs by ~1e-5 over 5 steps (a wrong
        # normalisation shows at 1e-2)
        assert max(abs(a - b) for a, b in zip(l1, l2)) < (1e-5 if mode == "ddp" else 5e-5), (mode, l1, l2)
        b0, b1 = torch.load(two / "bias_rank0.pt"), torch.load(two / "bias_rank1.pt")
        assert any(b.abs().sum() > 0 for b in b0)  # the update ran
        for x, y in zip(b0, b1):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        # both ranks issued the same collectives; they end with the final checkpoint's barrier and the exit barrier
        calls = same_collectives(two / "collectives_rank0.json", two / "collectives_rank1.json")
        step_sums = [c for c in calls if c[0] == "gloo:all_reduce" and c[2] == ["Double"]]  # ce, mtp, balance, stop
        assert len(step_sums) == 5, calls
        assert [c[0] for c in calls[-2:]] == ["gloo:barrier", "gloo:barrier"], calls[-3:]


DIVERGING_SCRIPT = DUMP_COLLECTIVES + """
import sys, torch
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
dist.all_reduce(torch.ones(4))
dist.all_reduce(torch.ones(2, dtype=torch.float32 if rank == 0 else torch.int32))  # 8 bytes: gloo runs it
dist.barrier()
dist.destroy_process_group()
dump_collectives(f"{sys.argv[1]}_rank{rank}.json")
"""


def test_same_collectives_finds_a_rank_dependent_collective(tmp_path):
    """The check of the tests above can fail: a collective whose dtype depends on the rank (same byte count, so gloo
    itself neither aborts nor hangs) is reported at its position."""
    script, calls = tmp_path / "diverge.py", tmp_path / "calls"
    script.write_text(DIVERGING_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), str(calls)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **FLIGHT_RECORDER_ENV})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with pytest.raises(AssertionError, match=r"differ at collective #\(1, .*'Float'.*'Int'"):
        same_collectives(f"{calls}_rank0.json", f"{calls}_rank1.json")


RESUME_SCRIPT = DUMP_COLLECTIVES + """
import os, sys
from nanoseek.distributed import cleanup
from nanoseek.train.pretrain import TrainConfig, train
out, steps, resume, calls = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
train(TrainConfig(steps=steps, batch_size=8, seq_len=24, lr=3e-3, warmup_steps=2, lr_schedule="constant",
                  bias_gamma=0.01, out=out, progress=False, dist_mode="fsdp", resume=resume, keep=1))
cleanup()
dump_collectives(f"{calls}_rank{os.environ['RANK']}.json")
"""


def test_fsdp_resume_is_exact(tmp_path):
    """FSDP2 on 2 ranks: 6 steps straight == 3 steps, a stop, and a resume to 6 (sharded model and optimizer state
    gathered into the checkpoint, then loaded back into the shards)."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)

    def run(out, steps, resume):
        calls = tmp_path / f"collectives_{out.name}_{steps}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
               str(out), str(steps), "1" if resume else "0", str(calls)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **FLIGHT_RECORDER_ENV})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        same_collectives(f"{calls}_rank0.json", f"{calls}_rank1.json")  # the resume's loading paths included

    run(tmp_path / "straight", 6, False)
    run(tmp_path / "split", 3, False)
    run(tmp_path / "split", 6, True)
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(straight) == 6 and len(split) == 6
    assert split == straight
