"""Serving benchmarks for `nanoseek serve` and its engine (issue 11), on one machine, same threads for every row.

1. Throughput over HTTP: ``--requests`` concurrent streamed requests of mixed prompt (16-400 tokens) and output
   (16-192 tokens) lengths sent to `nanoseek serve` (a subprocess), useful output tokens/s and p50/p99 time to
   first token and time per output token; against transformers ``generate`` on the same DeepSeek-V3 checkpoint in
   left-padded batches of ``--hf-batch`` (what a transformers user would write; every row of a batch runs to the
   batch's longest output, only the requested tokens count).
2. MLA vs MHA at the same cache budget (same depth, width and heads; MHA caches K and V of every head): sequences
   that fit, and engine throughput on a long-context workload where the budget binds, overall and over the decode
   steps alone (generation throughput, as DeepSeek-V2 reports it; prefill costs both the same).
3. Batch-1 decode against the memory-bandwidth roofline: bytes a step must read (weights + latent cache) / step
   time, against the copy bandwidth measured right after, at three context lengths.

    python benchmarks/serve.py                      # the full run (minutes on a CPU)
    python benchmarks/serve.py --quick              # a small smoke run
    python benchmarks/serve.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import BENCH, copy_bandwidth, cpu_name, weight_bytes  # noqa: E402  (the decode benchmark's helpers)

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.engine import Engine, SamplingParams, bytes_per_token, slots_for_budget  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int = 0):
    """n (prompt ids, output length) pairs, lengths uniform in the ranges; token 0..3 are specials, avoided."""
    rng = random.Random(seed)
    return [([rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
            for _ in range(n)]


def save_checkpoint(config: ModelConfig, directory: Path) -> Transformer:
    """A random-weight checkpoint with a tokenizer whose EOS is not a stop token (outputs run to their length)."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model.save_pretrained(directory)
    Tokenizer.char().save(directory)
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model


# ---------------------------------------------------------------------- 1. HTTP throughput vs transformers
async def http_run(url: str, name: str, jobs) -> dict:
    import httpx

    async def one(client, prompt, n):
        body = {"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        times = []
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
        return t0, times

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=len(jobs))) as client:
        t = time.perf_counter()
        results = await asyncio.gather(*(one(client, p, n) for p, n in jobs))
        wall = time.perf_counter() - t
    ttft = [times[0] - t0 for t0, times in results]
    tpot = [(times[-1] - times[0]) / (n - 1) for (t0, times), (_, n) in zip(results, jobs) if n > 1]
    tokens = sum(n for _, n in jobs)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99), "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99)}


def serve_throughput(directory: Path, jobs, threads: int, cache_mb: float, max_batch: int, max_len: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(directory), "--port", str(port),
           "--cache-memory", str(cache_mb), "--max-batch", str(max_batch), "--max-model-len", str(max_len),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the server did not start")
        asyncio.run(http_run(url, directory.name, jobs[:2]))  # warm-up
        return asyncio.run(http_run(url, directory.name, jobs))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def hf_throughput(directory: Path, jobs, batch: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    pad = 0
    t = time.perf_counter()
    for i in range(0, len(jobs), batch):
        group = jobs[i : i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        n = max(k for _, k in group)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=pad)
    wall = time.perf_counter() - t
    tokens = sum(n for _, n in jobs)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "batch": batch}


# ---------------------------------------------------------------------- 2. MLA vs MHA at one cache budget
def engine_throughput(model: Transformer, jobs, cache_bytes: int, max_len: int, prefill_tokens: int) -> dict:
    slots = slots_for_budget(model, cache_bytes, max_len)
    engine = Engine(model, slots, max_len, prefill_tokens=prefill_tokens)
    for p, n in jobs:
        engine.add(p, SamplingParams(max_tokens=n))
    t = time.perf_counter()
    engine.run()
    wall = time.perf_counter() - t
    tokens = sum(n for _, n in jobs)
    return {"slots": slots, "bytes_per_token": bytes_per_token(model), "tokens_per_s": tokens / wall,
            "seconds": wall, "decode_tokens_per_s": engine.decode_tokens / engine.decode_seconds}


# ---------------------------------------------------------------------- 3. batch-1 decode roofline
def decode_roofline(model: Transformer, context: int, steps: int) -> dict:
    engine = Engine(model, 1, context + steps + 2)
    vocab = model.config.vocab_size
    engine.add([4 + i % (vocab - 4) for i in range(context)], SamplingParams(max_tokens=steps + 2))
    engine.step()  # prefill and the first decode step (warm-up)
    times = []
    while engine.has_work():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    read = weight_bytes(model) + (context + steps // 2) * bytes_per_token(model)
    bandwidth = copy_bandwidth()
    return {"context": context, "step_ms": step * 1e3, "bytes_per_step": read, "achieved_GBps": read / step / 1e9,
            "copy_GBps": bandwidth / 1e9, "fraction": read / step / bandwidth}


def median_range(runs: list[dict], key: str, fmt: str) -> str:
    """"median (min-max)" of ``run[key]`` over runs."""
    values = sorted(run[key] for run in runs)
    return f"{statistics.median(values):{fmt}} ({values[0]:{fmt}}-{values[-1]:{fmt}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (12 requests, short lengths)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--roofline-repeats", type=int, default=3, help="batch-1 decode measurements per context")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    n_req = 12 if quick else args.requests
    prompts, outputs = ((16, 64), (8, 24)) if quick else ((16, 400), (16, 192))
    config = ModelConfig(**{**BENCH, "num_hidden_layers": 2, "max_position_embeddings": 8192,
                            "vocab_size": 512 if quick else BENCH["vocab_size"], "eos_token_id": None})
    results: dict = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "deepseek-v3-bench"
        model = save_checkpoint(config, directory)
        jobs = workload(n_req, prompts, outputs, config.vocab_size)
        max_len = prompts[1] + outputs[1]
        budget_mb = n_req * max_len * bytes_per_token(model) / 2**20 + 1
        serve = serve_throughput(directory, jobs, args.threads, budget_mb, n_req, max_len)
        hf = hf_throughput(directory, jobs, args.hf_batch)
        results["http"] = {"nanoseek_serve": serve, "transformers_generate": hf,
                           "speedup": serve["tokens_per_s"] / hf["tokens_per_s"]}

    # MLA vs MHA: same depth, width and heads; the budget holds 16 MLA sequences of the long workload
    long_prompt, long_out = ((256, 300), (32, 48)) if quick else ((1500, 2000), (64, 128))
    max_len = long_prompt[1] + long_out[1]
    mla = Transformer(config).eval()
    mha = Transformer(config.replace(attention_type="mha", num_key_value_heads=config.num_attention_heads,
                                     head_dim=config.qk_nope_head_dim)).eval()
    budget = 16 * max_len * bytes_per_token(mla)
    long_jobs = workload(8 if quick else 32, long_prompt, long_out, config.vocab_size, seed=1)
    rows = {name: engine_throughput(m, long_jobs, budget, max_len, 512) for name, m in (("mla", mla), ("mha", mha))}
    c = config
    results["mla_vs_mha"] = {**rows, "budget_MiB": budget / 2**20, "fit_ratio": rows["mla"]["slots"] /
                             max(rows["mha"]["slots"], 1), "paper_ratio": 2 * c.num_attention_heads *
                             c.qk_nope_head_dim / (c.kv_lora_rank + c.qk_rope_head_dim),
                             "throughput_ratio": rows["mla"]["tokens_per_s"] / rows["mha"]["tokens_per_s"],
                             "decode_throughput_ratio": rows["mla"]["decode_tokens_per_s"] /
                             rows["mha"]["decode_tokens_per_s"]}
    contexts = (64, 256) if quick else (512, 2048, 4096)
    runs = [decode_roofline(mla, context, 16 if quick else 64) for _ in range(args.roofline_repeats)
            for context in contexts]  # contexts interleaved, so a slow spell of the machine hits them all
    results["roofline"] = [{"context": c, "runs": [r for r in runs if r["context"] == c]} for c in contexts]

    h, m, r = results["http"], results["mla_vs_mha"], results["roofline"]
    print(f"# {results['cpu']}, {args.threads} threads, torch {results['torch']}")
    print(f"\n## 1. {n_req} concurrent requests over HTTP (prompts {prompts[0]}-{prompts[1]}, outputs "
          f"{outputs[0]}-{outputs[1]} tokens)")
    print("| system | output tokens/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |\n|---|---|---|---|")
    s = h["nanoseek_serve"]
    print(f"| nanoseek serve (HTTP, streaming) | {s['tokens_per_s']:.1f} | {s['ttft_p50']:.2f} / {s['ttft_p99']:.2f} "
          f"| {s['tpot_p50'] * 1e3:.1f} / {s['tpot_p99'] * 1e3:.1f} |")
    hf_rate = h["transformers_generate"]["tokens_per_s"]
    print(f"| transformers generate, padded batches of {args.hf_batch} | {hf_rate:.1f} | - | - |")
    print(f"speed-up: {h['speedup']:.2f}x")
    print(f"\n## 2. MLA vs MHA at one cache budget ({m['budget_MiB']:.1f} MiB, sequences of {max_len} tokens)")
    print("| attention | bytes/token | sequences that fit | output tokens/s (all) | output tokens/s (decode steps) |\n"
          "|---|---|---|---|---|")
    for name in ("mla", "mha"):
        row = m[name]
        print(f"| {name.upper()} | {row['bytes_per_token']:,} | {row['slots']} | {row['tokens_per_s']:.1f} | "
              f"{row['decode_tokens_per_s']:.1f} |")
    print(f"fit ratio {m['fit_ratio']:.1f}x (2·n_h·d_h/(d_c+d_R) = {m['paper_ratio']:.1f}x), throughput ratio "
          f"{m['throughput_ratio']:.2f}x overall, {m['decode_throughput_ratio']:.2f}x in decode (generation) steps")
    print(f"\n## 3. Batch-1 decode against the copy-bandwidth roofline (median, range of {args.roofline_repeats} runs)"
          "\n| context | ms/step | MiB read/step | GB/s | copy GB/s | of the roofline |\n|---|---|---|---|---|---|")
    for row in r:
        runs = row["runs"]
        mib = runs[0]["bytes_per_step"] / 2**20
        print(f"| {row['context']} | {median_range(runs, 'step_ms', '.2f')} | {mib:.1f} | "
              f"{median_range(runs, 'achieved_GBps', '.1f')} | {median_range(runs, 'copy_GBps', '.1f')} | "
              f"{median_range(runs, 'fraction', '.0%')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
