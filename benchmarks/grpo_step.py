"""GRPO step: nanoseek vs TRL's GRPOTrainer on the same tiny random Hugging Face Llama, on CPU.

``--arch deepseek_v3`` instead runs both on the same random nanoseek DeepSeek-V3 (MLA + MoE) checkpoint:
nanoseek through its own model and latent-cache ``generate``, TRL through transformers' DeepseekV3. A random model
over the 100-token character vocabulary emits eos with probability ~1/100 per token, so completions have mixed
lengths (geometric, mean ~75-100, a few reaching the cap): the R1-style case where padding every row to the
longest one is the cost that grows.
Same task (built-in arithmetic, or ``--task countdown``: longer prompts), prompts per step P, generations G,
max completion length L, β, μ, lr, temperature and thread count. Each trainer runs in a fresh subprocess, so its
peak RSS (``ru_maxrss``: the process high-water mark, everything torch allocated included) is its own. The first
step is warm-up; the time per step is the median of the others. A step is one rollout of P × G completions and its μ
passes (TRL logs those as μ optimizer steps; they are added up).

    python benchmarks/grpo_step.py                      # defaults below
    python benchmarks/grpo_step.py --steps 8 --json out.json
    python benchmarks/grpo_step.py --arch deepseek_v3 --hidden 64 --layers 2
    python benchmarks/grpo_step.py --arch deepseek_v3 --hidden 256 --layers 4 --P 4 --G 8 --L 384 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_model(directory: Path, hidden: int, layers: int, arch: str = "llama") -> None:
    """A random checkpoint + char tokenizer: a transformers Llama, or a nanoseek DeepSeek-V3 MoE (HF format)."""
    import torch
    import transformers

    from nanoseek import ModelConfig, Transformer
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.char()
    torch.manual_seed(0)
    if arch == "deepseek_v3":
        cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                 num_nextn_predict_layers=0, max_position_embeddings=2048)
        Transformer(cfg).save_pretrained(directory)
        tok.save(directory)
        return
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=max(hidden // 32, 1),
                                   max_position_embeddings=256, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save(directory)


def run_workers(script: str, names: tuple[str, ...], model: Path, a: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    """Run ``script --worker NAME`` once per name, each in a fresh process (so peak RSS is its own); collect the
    JSON each prints on its ``RESULT`` line."""
    results = {}
    for name in names:
        argv = [sys.executable, script, "--worker", name, "--model", str(model)]
        for k in keys:
            v = getattr(a, k)
            if not isinstance(v, bool):
                argv.append(f"--{k}={v}")
            elif v:  # a store_true flag
                argv.append("--" + k.replace("_", "-"))
        proc = subprocess.run(argv, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    return results


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_nanoseek(a: argparse.Namespace, out: Path) -> dict:
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    train_grpo(GRPOConfig(
        model=a.model, out=str(out), task=a.task, num_generations=a.G, prompts_per_step=a.P, max_completion_length=a.L,
        steps=a.steps, lr=a.lr, beta=a.beta, num_iterations=a.mu, temperature=1.0, loss_type="grpo",
        progress=False, log_completions_every=0, seed=0, share_prompts=not a.no_share_prompts,
    ))
    ms = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = sum(m["step_time"] for m in ms)
    tokens = sum(m["completions/mean_length"] * a.P * a.G for m in ms)
    return {"s_per_step": statistics.median(m["step_time"] for m in ms), "completion_tok_per_s": tokens / seconds,
            "reward": sum(m["reward"] for m in ms) / len(ms),
            "mean_length": statistics.mean(m["completions/mean_length"] for m in ms),
            "max_length": max(m["completions/max_length"] for m in ms),
            "processed_over_real": statistics.mean(m["tokens/processed_over_real"] for m in ms)}


def run_trl(a: argparse.Namespace, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.tasks import Example, examples, get_task

    task = get_task(a.task)
    exs = examples(task, a.P * a.steps * a.mu, "train", seed=0)
    ds = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in exs])

    def task_reward(prompts, completions, answer, **kw):
        return [task.score(c, Example(p, "", ans)) for p, c, ans in zip(prompts, completions, answer)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *args, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kw):
            self.times.append(time.perf_counter() - self.start)

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=a.P * a.G, num_generations=a.G,
        max_completion_length=a.L, max_steps=a.steps * a.mu, beta=a.beta, num_iterations=a.mu, learning_rate=a.lr,
        temperature=1.0, loss_type="grpo", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    clock = Clock()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(a.model), reward_funcs=[task_reward],
                          args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(a.model),
                          callbacks=[clock])
    trainer.train()
    # TRL takes μ optimizer steps per rollout (generating on the first): one nanoseek step = μ TRL steps
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    times = clock.times[a.mu:]
    tokens = sum(h["completions/mean_length"] * a.P * a.G for h in logs)
    per_rollout = [sum(times[i : i + a.mu]) for i in range(0, len(times), a.mu)]
    return {"s_per_step": statistics.median(per_rollout), "completion_tok_per_s": tokens / sum(times),
            "reward": sum(h["reward"] for h in logs) / len(logs),
            "mean_length": statistics.mean(h["completions/mean_length"] for h in logs),
            "max_length": max(h["completions/max_length"] for h in logs)}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_nanoseek if a.worker == "nanoseek" else run_trl)(a, Path(tmp))
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--P", type=int, default=8, help="prompts per step")
    p.add_argument("--G", type=int, default=8, help="generations per prompt")
    p.add_argument("--L", type=int, default=16, help="max completion length")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--mu", type=int, default=1, help="num_iterations")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=6, help="rollouts (nanoseek steps); TRL runs steps × mu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arch", choices=["llama", "deepseek_v3"], default="llama")
    p.add_argument("--task", choices=["arithmetic", "countdown"], default="arithmetic")
    p.add_argument("--no-share-prompts", action="store_true", help="nanoseek runs every row's prompt separately")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the pair of trainers this many times, alternating, and report the medians (a shared "
                        "machine's load drifts: alternating exposes both to it alike)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", choices=["nanoseek", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama"
        make_model(model, a.hidden, a.layers, a.arch)
        runs = [run_workers(__file__, ("nanoseek", "trl"), model, a, ("P", "G", "L", "beta", "mu", "lr", "steps",
                                                                      "threads", "no_share_prompts", "task"))
                for _ in range(a.repeats)]
    results = {name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
               for name in ("nanoseek", "trl")}
    n, t = results["nanoseek"], results["trl"]
    print(f"random {a.arch} hidden={a.hidden} layers={a.layers}; task {a.task}; P={a.P} G={a.G} L={a.L} "
          f"beta={a.beta} mu={a.mu}; "
          f"{a.steps} steps (first excluded); {a.threads} thread(s); medians of {a.repeats} alternating run(s)"
          f"{'; nanoseek without prompt sharing' if a.no_share_prompts else ''}")
    print(f"{'':10} {'s/step':>8} {'compl tok/s':>12} {'peak RSS MB':>12} {'mean reward':>12} "
          f"{'mean/max len':>13}")
    for name, r in results.items():
        print(f"{name:10} {r['s_per_step']:8.3f} {r['completion_tok_per_s']:12.1f} {r['peak_rss_mb']:12.0f} "
              f"{r['reward']:12.3f} {r['mean_length']:7.1f}/{r['max_length']:<5.0f}")
    print(f"nanoseek processed / real tokens in log-prob and training passes: {n['processed_over_real']:.3f}")
    print(f"speed-up nanoseek/TRL: {t['s_per_step'] / n['s_per_step']:.2f}x (time per step), "
          f"{n['completion_tok_per_s'] / t['completion_tok_per_s']:.2f}x (completion tokens/s)")
    if a.repeats > 1:
        ratios = sorted(r["trl"]["s_per_step"] / r["nanoseek"]["s_per_step"] for r in runs)
        print(f"per-run speed-ups (time per step): {', '.join(f'{x:.2f}x' for x in ratios)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
