"""Training throughput (forward + backward + AdamW step), tokens/s:

1. nanoseek vs transformers' DeepseekV3ForCausalLM: same config, same weights (transformers loads nanoseek's
   checkpoint; its logits are checked against ours first), same batch, same loss (mean next-token CE on the
   logits) and optimizer. MTP is off here (transformers has no MTP training); nanoseek's own rows add it back.
2. nanoseek MLA vs MHA at equal parameter count (the MHA baseline's head size is chosen to match parameters).
3. nanoseek fp32 vs bf16 autocast (fp32 master weights).

Every implementation runs under the same thread count, interleaved round by round, median step time reported.

    python benchmarks/train.py                 # small preset, batch 8 x 128 tokens
    python benchmarks/train.py --quick         # fewer rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.train.schedule import param_groups


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mha_config_of_equal_size(config: ModelConfig) -> ModelConfig:
    """The MHA baseline (same heads) whose head size gives the parameter count closest to the MLA model's."""
    target = Transformer(config).num_parameters()
    best = None
    for head_dim in range(8, 257, 2):
        cand = config.replace(attention_type="mha", head_dim=head_dim)
        with torch.device("meta"):
            n = Transformer(cand).num_parameters()
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), cand)
    return best[1]


class Runner:
    """One model + AdamW; ``step()`` = forward, mean next-token CE (+ MTP), backward, clip, optimizer step."""

    def __init__(self, name: str, model: torch.nn.Module, ids: torch.Tensor, hf: bool = False, bf16: bool = False,
                 mtp: bool = False):
        self.name, self.model, self.ids, self.hf, self.bf16, self.mtp = name, model.train(), ids, hf, bf16, mtp
        self.opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
        self.times: list[float] = []

    def step(self) -> None:
        t0 = time.perf_counter()
        inputs, targets = self.ids[:, :-1], self.ids[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.hf:
                logits, extra = self.model(inputs).logits, []
            elif self.mtp:
                logits, extra = self.model(inputs, return_mtp=True)
            else:
                logits, extra = self.model(inputs), []
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1))
        for k, lk in enumerate(extra, start=1):
            loss = loss + 0.3 * F.cross_entropy(lk.float().reshape(-1, V), targets[:, k:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each runs every implementation once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers

    config = ModelConfig.preset(args.preset, num_nextn_predict_layers=0, max_position_embeddings=max(
        512, args.seq_len + 1))
    ours = Transformer(config)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():  # same function before timing
        torch.testing.assert_close(ours.eval()(ids[:, :-1]), theirs.eval()(ids[:, :-1]).logits, atol=1e-4, rtol=0)
    mha_config = mha_config_of_equal_size(config)
    torch.manual_seed(0)
    mha = Transformer(mha_config)
    torch.manual_seed(0)
    with_mtp = Transformer(config.replace(num_nextn_predict_layers=1))
    runners = [
        Runner("nanoseek MLA", ours, ids),
        Runner("transformers DeepseekV3", theirs, ids, hf=True),
        Runner("nanoseek MHA (equal params)", mha, ids),
        Runner("nanoseek MLA bf16 autocast", Transformer(config).to(torch.float32), ids, bf16=True),
        Runner("nanoseek MLA + MTP (D=1)", with_mtp, ids, mtp=True),
    ]
    for _ in range(args.warmup):
        for r in runners:
            r.step()
    for r in runners:
        r.times.clear()
    for _ in range(args.rounds):
        for r in runners:
            r.step()
    tokens = args.batch * args.seq_len
    rows = []
    base = statistics.median(runners[1].times)
    for r in runners:
        med = statistics.median(r.times)
        rows.append(dict(impl=r.name, params=sum(p.numel() for p in {id(p): p for p in r.model.parameters()}.values()),
                         ms_per_step=1000 * med, tokens_per_s=tokens / med, vs_transformers=base / med))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: preset {args.preset} (no MTP unless stated): hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, {config.n_routed_experts} routed experts "
          f"top-{config.num_experts_per_tok}"
          f"; MHA baseline: {mha_config.num_attention_heads} heads x {mha_config.head_dim}; batch {args.batch} x "
          f"{args.seq_len} tokens; median of {args.rounds} rounds")
    print(f"{'impl':30s} {'params':>10s} {'ms/step':>9s} {'tok/s':>9s} {'vs HF':>7s}")
    for row in rows:
        print(f"{row['impl']:30s} {row['params']:>10,} {row['ms_per_step']:9.1f} {row['tokens_per_s']:9.0f} "
              f"{row['vs_transformers']:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
