"""GRPO vs the PPO baseline on the same policy and the same rollouts: peak memory and time per step, on CPU.

Both start from the same random Hugging Face Llama (large enough that weights and optimizer state, not the
Python runtime, dominate memory), sample the same P × G completions per step (same seeds), and use the same β
(GRPO: k3 KL in the loss; PPO: KL in the per-token reward), so both hold a reference model. PPO adds its critic
(a policy-sized transformer with a value head) and the critic's AdamW state. Each trainer runs in a fresh
subprocess; peak memory is that process's RSS high-water mark (``ru_maxrss``), torch's allocations included.

    python benchmarks/grpo_vs_ppo.py
    python benchmarks/grpo_vs_ppo.py --hidden 512 --layers 8 --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def worker(a: argparse.Namespace) -> None:
    import torch
    from grpo_step import peak_rss_mb

    from nanoseek.policy import Policy
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.grpo import GRPO, GRPOConfig
    from nanoseek.train.ppo import PPO, PPOConfig
    from nanoseek.train.rl import RLTrainer

    torch.set_num_threads(a.threads)
    tok = Tokenizer.load(a.model)
    policy = Policy.load(a.model, tok.pad_id, tok.eos_id)
    kw = dict(model=a.model, num_generations=a.G, prompts_per_step=a.P, max_completion_length=a.L, lr=1e-5,
              beta=a.beta, seed=0)
    trainer = RLTrainer(GRPOConfig(**kw), policy, tok, GRPO) if a.worker == "grpo" else \
        RLTrainer(PPOConfig(**kw, critic_lr=1e-5), policy, tok, PPO)
    times, lengths = [], []
    for step in range(1, a.steps + 1):
        t0 = time.perf_counter()
        m, _ = trainer.step(step)
        times.append(time.perf_counter() - t0)
        lengths.append(m["completions/mean_length"])
    n_params = sum(p.numel() for p in policy.model.parameters())
    critic = getattr(trainer.algorithm, "critic", None)
    result = {"s_per_step": sum(times[1:]) / max(len(times) - 1, 1), "policy_params": n_params,
              "critic_params": sum(p.numel() for p in critic.parameters()) if critic is not None else 0,
              "mean_completion_length": sum(lengths) / len(lengths),
              "peak_rss_mb": peak_rss_mb()}
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--P", type=int, default=4, help="prompts per step")
    p.add_argument("--G", type=int, default=4, help="generations per prompt")
    p.add_argument("--L", type=int, default=16, help="max completion length")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=["grpo", "ppo"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    sys.path.insert(0, str(Path(__file__).parent))
    from grpo_step import make_model, run_workers

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama"
        make_model(model, a.hidden, a.layers)
        results = run_workers(__file__, ("grpo", "ppo"), model, a, ("P", "G", "L", "beta", "steps", "threads"))
    g, q = results["grpo"], results["ppo"]
    print(f"random Llama hidden={a.hidden} layers={a.layers} ({g['policy_params'] / 1e6:.1f}M params); "
          f"P={a.P} G={a.G} L={a.L} beta={a.beta}; {a.steps} steps (first excluded from time); {a.threads} thread(s)")
    print(f"{'':6} {'s/step':>8} {'peak RSS MB':>12} {'critic params':>14}")
    for name, r in results.items():
        print(f"{name:6} {r['s_per_step']:8.2f} {r['peak_rss_mb']:12.0f} {r['critic_params']:14,}")
    print(f"GRPO / PPO: peak memory {100 * g['peak_rss_mb'] / q['peak_rss_mb']:.0f}%, "
          f"time per step {100 * g['s_per_step'] / q['s_per_step']:.0f}%")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
