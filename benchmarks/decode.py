"""Decode throughput: nanoseek MLA (absorbed / naive), nanoseek MHA, transformers DeepseekV3 `generate` (eager).

Same weights and config for the three MLA rows (the transformers model loads nanoseek's checkpoint), the MHA
baseline has the same heads and head dim; same thread count for all. For every (batch, context) the context is
prefilled once with nanoseek (one row, copied to all B rows: decode cost does not depend on the contents) and the
same latents are handed to transformers' cache, after checking that its next-token logits equal ours. Then
``--steps`` greedy decode steps are timed. Achieved bandwidth = bytes a step must read (weights + KV cache) / time,
against the machine's measured copy bandwidth.

    python benchmarks/decode.py            # full: contexts 512/2048/8192, batch 1/8
    python benchmarks/decode.py --quick    # contexts 128/512, batch 1/4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cache import KVCache, elements_per_token

# A small DeepSeek-V3-shaped model (dense FFN so every step reads all weights): V2's head layout scaled down.
BENCH = dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
             num_hidden_layers=2, first_k_dense_replace=2, num_attention_heads=16, q_lora_rank=384,
             kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
             max_position_embeddings=16384, initializer_range=0.02)


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), best of ``reps``."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def weight_bytes(model: Transformer) -> int:
    """Bytes of the weights one decode step reads: everything but the embedding table (only B rows of it)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith(("embed_tokens", "mtp.")))


def filled_cache(model: Transformer, B: int, ctx: int, steps: int, ids: torch.Tensor) -> KVCache:
    """A (B, ctx + steps) cache holding the prefill of ``ids: (1, ctx)`` in every row."""
    one = model.new_cache(1, ctx + steps)
    with torch.inference_mode():
        model(ids, one)
    cache = model.new_cache(B, ctx + steps)
    for name, layers in cache.buffers.items():
        for buf, src in zip(layers, one.buffers[name]):
            buf.copy_(src.expand_as(buf))
    cache.lengths.fill_(ctx)
    return cache


def time_nanoseek(model: Transformer, cache: KVCache, first: torch.Tensor, steps: int) -> float:
    """Seconds per greedy decode step (the loop `generate` runs), median over ``steps`` steps."""
    ctx = int(cache.lengths[0])
    times = []
    with torch.inference_mode():
        tok = first
        for _ in range(steps + 1):  # the first step is a warm-up
            t = time.perf_counter()
            tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t)
    cache.lengths.fill_(ctx)
    return sorted(times[1:])[len(times[1:]) // 2]


def hf_cache_from(cache: KVCache, hf) -> object:
    """transformers' DynamicCache holding the same latents (it stores c_KV and k_R as (B, 1, S, ·))."""
    from transformers import DynamicCache

    dyn = DynamicCache(config=hf.config)
    ctx = int(cache.lengths[0])
    for layer in range(hf.config.num_hidden_layers):
        widths = [hf.config.kv_lora_rank, hf.config.qk_rope_head_dim]
        c_kv, k_pe = cache.read(layer, "latent", ctx)[:, None].split(widths, dim=-1)
        dyn.update(c_kv.contiguous(), k_pe.contiguous(), layer)
    return dyn


def time_hf(hf, cache: KVCache, ids: torch.Tensor, first: torch.Tensor, steps: int, check: torch.Tensor | None):
    """Seconds per decode step of ``hf.generate`` continuing from our prefilled latents (no prefill timed)."""
    B = first.shape[0]
    full = torch.cat((ids.expand(B, -1), first), dim=1)
    with torch.inference_mode():
        if check is not None:  # transformers on our latents gives our next-token logits
            out = hf(first, cache=hf_cache_from(cache, hf)).logits[0, -1]
            torch.testing.assert_close(out, check, atol=1e-3, rtol=1e-3)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        hf.generate(full, cache=hf_cache_from(cache, hf), max_new_tokens=2, min_new_tokens=2, **kw)
        dyn = hf_cache_from(cache, hf)
        t = time.perf_counter()
        hf.generate(full, cache=dyn, max_new_tokens=steps, min_new_tokens=steps, **kw)
        return (time.perf_counter() - t) / steps


def speculative(steps: int = 200, new_tokens: int = 192) -> dict:
    """MTP self-speculation on a small model trained briefly (next-token + depth-1 MTP loss) to continue a fixed
    random 61-token cycle: a best case where the draft is learnable. Checks output == plain greedy."""
    from nanoseek.generate import generate, run_engine

    cfg = ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, first_k_dense_replace=4, num_attention_heads=4, q_lora_rank=64,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      num_nextn_predict_layers=1, max_position_embeddings=512)
    model = Transformer(cfg)
    cycle = torch.randint(0, cfg.vocab_size, (61,))
    stream = cycle.repeat(20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ce = torch.nn.functional.cross_entropy
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 65, (16,))
        ids = torch.stack([stream[s : s + 64] for s in starts])
        logits, (mtp,) = model(ids, return_mtp=True)
        loss = ce(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # next token
        loss = loss + ce(mtp[:, :-1].flatten(0, 1), ids[:, 2:].flatten())  # MTP depth 1: the token after
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = dict(train_steps=steps, final_loss=loss.item(), new_tokens=new_tokens)
    for B in (1, 4):
        prompts = [stream[s : s + 16].tolist() for s in range(0, 4 * B, 4)][:B]
        t = time.perf_counter()
        plain = generate(model, prompts, new_tokens)
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        requests, engine = run_engine(model, prompts, new_tokens, speculative=True)
        t_spec = time.perf_counter() - t
        spec, rate = [r.output_ids for r in requests], engine.spec_accepted[0] / engine.spec_proposed[0]
        assert spec == plain, "speculative greedy differs from plain greedy"
        out[f"batch{B}"] = dict(acceptance=rate, plain_tokens_per_s=B * new_tokens / t_plain,
                                speculative_tokens_per_s=B * new_tokens / t_spec, speedup=t_plain / t_spec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="contexts 128/512, batch 1/4")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contexts, batches = ([128, 512], [1, 4]) if args.quick else ([512, 2048, 8192], [1, 8])

    cfg = ModelConfig(**BENCH)
    mla = Transformer(cfg).eval()
    mha = Transformer(cfg.replace(attention_type="mha", head_dim=cfg.v_head_dim)).eval()
    hf = None
    if not args.no_hf:
        import transformers

        with tempfile.TemporaryDirectory() as d:
            mla.save_pretrained(d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    bw = copy_bandwidth()
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {machine}; measured copy bandwidth {bw / 1e9:.1f} GB/s (read+write)")
    print(f"model: DeepSeek-V3 shape, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, d_c={cfg.kv_lora_rank}, d_R={cfg.qk_rope_head_dim}, "
          f"d_nope={cfg.qk_nope_head_dim}, d_v={cfg.v_head_dim}, dense FFN {cfg.intermediate_size}, vocab "
          f"{cfg.vocab_size}; {mla.num_parameters() / 1e6:.1f}M params (MHA baseline "
          f"{mha.num_parameters() / 1e6:.1f}M: {cfg.num_attention_heads} heads x {cfg.v_head_dim}); fp32")

    rows = []
    print(f"{'impl':<16}{'batch':>6}{'context':>9}{'tok/s':>10}{'ms/step':>10}{'cache B/tok':>13}{'GB/s':>8}"
          f"{'% copy':>8}")
    for ctx in contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, ctx))
        for B in batches:
            first = torch.randint(0, cfg.vocab_size, (B, 1))
            cache = filled_cache(mla, B, ctx, args.steps + 2, ids)
            mla.set_decode_impl("absorb")
            with torch.inference_mode():
                check = mla(first, cache)[0, -1]
            cache.lengths.fill_(ctx)
            results = {}
            for impl in ("absorb", "naive"):
                mla.set_decode_impl(impl)
                results[f"mla-{impl}"] = (time_nanoseek(mla, cache, first, args.steps), mla, cache)
            if hf is not None:
                results["transformers"] = (time_hf(hf, cache, ids, first, args.steps, check), mla, cache)
            del cache
            mcache = filled_cache(mha, B, ctx, args.steps + 2, ids)
            results["mha"] = (time_nanoseek(mha, mcache, first, args.steps), mha, mcache)
            for impl, (sec, model, c) in results.items():
                per_tok = c.bytes_per_token()
                read = weight_bytes(model) + B * ctx * per_tok
                row = dict(impl=impl, batch=B, context=ctx, tokens_per_s=B / sec, ms_per_step=1e3 * sec,
                           cache_bytes_per_token=per_tok, achieved_GBps=read / sec / 1e9,
                           fraction_of_copy_bw=read / sec / bw)
                rows.append(row)
                print(f"{impl:<16}{B:>6}{ctx:>9}{row['tokens_per_s']:>10.1f}{row['ms_per_step']:>10.1f}"
                      f"{per_tok:>13,}{row['achieved_GBps']:>8.1f}{100 * row['fraction_of_copy_bw']:>7.0f}%")
            del mcache

    def speed(impl, B, ctx):
        return next((r["tokens_per_s"] for r in rows if (r["impl"], r["batch"], r["context"]) == (impl, B, ctx)), None)

    print("\nratios (tokens/s):")
    for ctx in contexts:
        for B in batches:
            a, n, t = speed("mla-absorb", B, ctx), speed("mla-naive", B, ctx), speed("transformers", B, ctx)
            line = f"  batch {B} context {ctx}: absorbed/naive {a / n:.2f}x"
            if t:
                line += f", absorbed/transformers {a / t:.2f}x"
            print(line)
    v2 = ModelConfig.preset("deepseek-v2")
    mla_v2 = elements_per_token(v2) * 4
    mha_v2 = elements_per_token(v2.replace(attention_type="mha", head_dim=v2.v_head_dim)) * 4
    print(f"\nV2 dims (60 layers, 128 heads x 128, d_c 512, d_R 64), fp32 cache bytes/token: "
          f"MLA {mla_v2:,} vs MHA {mha_v2:,} = {100 * mla_v2 / mha_v2:.2f}%")
    spec = speculative()
    print(f"\nMTP self-speculative greedy decoding (small 4-layer model, {spec['train_steps']} training steps on a "
          f"fixed 61-token cycle, loss {spec['final_loss']:.3f}; output == plain greedy, checked):")
    for B in (1, 4):
        r = spec[f"batch{B}"]
        print(f"  batch {B}: acceptance {100 * r['acceptance']:.0f}%, plain {r['plain_tokens_per_s']:.0f} tok/s, "
              f"speculative {r['speculative_tokens_per_s']:.0f} tok/s ({r['speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, copy_bandwidth_Bps=bw, config=BENCH, steps=args.steps, rows=rows,
                           v2_cache_bytes_per_token=dict(mla=mla_v2, mha=mha_v2), speculative=spec), f, indent=1)


if __name__ == "__main__":
    main()
