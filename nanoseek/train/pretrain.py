"""Pretraining and SFT: one loop, two data modes (``nanoseek pretrain`` / ``nanoseek sft``). Per optimizer step,
over ``grad_accum`` micro-batches of this rank's share of the global batch:

    L = CE(next token) + λ/D Σ_k CE_k (MTP, V3 eq. 24-25) + α Σ_layers L_Bal (V3 eq. 17-20)

each term normalised by its token (or sequence) count over the *global* batch, so the loss and gradients do
not depend on the number of processes or micro-batches. After the AdamW step, outside autograd, every MoE
layer's selection bias moves by b_i += γ·sign(mean_load − load_i) with the load summed over micro-batches and
all-reduced over ranks (V3 §2.1.2, aux-loss-free balancing). Every batch is a function of (seed, step), so a
resumed run continues bit-exactly. Ctrl-C finishes the current step, saves and exits."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import cli_args
from nanoseek.checkpoint import load_checkpoint, resolve_model_dir, set_rng_state
from nanoseek.cli_args import check_ranges, option
from nanoseek.config import ModelConfig
from nanoseek.corpus import PrepareConfig, prepare
from nanoseek.data import IGNORE, LMBatch, SFTData, ShardData, bits_per_byte, make_data
from nanoseek.distributed import all_reduce_, barrier, init_distributed, is_main, wrap_model
from nanoseek.flops import flops_per_token, measure_peak_flops, mfu
from nanoseek.metrics import greedy_samples
from nanoseek.model.moe import RouterStats, update_expert_bias
from nanoseek.model.mtp import mtp_loss
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.loop import RunConfig, StopFlag, run_loop, save, start_run
from nanoseek.train.rl_data import DatasetConfig
from nanoseek.train.schedule import OptimConfig, adamw, clip_grad_norm, lr_at, set_lr

# a built-in task's model chats in its training format: a user turn is the raw prompt, a reply its completion + EOS
RAW_TEMPLATE = "{% for m in messages %}{{ m.content + (eos_token if m.role == 'assistant' else '') }}{% endfor %}"


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig, OptimConfig):
    """``nanoseek pretrain`` (the CLI flags are generated from the fields); ``mode="sft"`` trains on completions."""

    mode: str = option("pretrain", "pretrain (loss on all tokens) or sft", choices=("pretrain", "sft"), cli=False)
    # model: a preset, or a config.json of ModelConfig fields, plus overrides; or a checkpoint to start from
    preset: str = option("tiny", "model preset (tiny | small | deepseek-v2-lite | deepseek-v2 | deepseek-v3)")
    model_config: str | None = option(None, "JSON file of ModelConfig fields (unknown keys are an error)")
    overrides: dict = option(default_factory=dict, help="model config fields to override", cli=False)  # --set
    model: str | None = option(None, "checkpoint directory to start from (fine-tuning)")
    # data
    task: str | None = option("arithmetic", "built-in task; ignored when --data is given")
    data: list[str] = option(default_factory=list, help="local .txt / .jsonl files (take precedence over --task)")
    data_dir: str | None = option(None, "shards made by `nanoseek prepare`, with their tokenizer (over --data, --task)")
    eval_every: int = option(0, "validation loss and bits per byte every N steps (0: never; needs shards)", min=0)
    eval_tokens: int = option(32768, "validation tokens: the first of the val split", min=1)
    sample_every: int = option(0, "log greedy samples of --sample-prompts every N steps (0: never)", min=0)
    sample_prompts: list[str] = option(default_factory=lambda: ["def ", "import "], help="prompts of --sample-every")
    peak_flops: float | None = option(None, "peak FLOP/s for train/mfu (default: `nanoseek info --peak`)", min=0)
    tokenizer: str | None = option(None, "directory with tokenizer.json (default: the character tokenizer)")
    allow_unknown_chars: bool = option(False, "let characters the tokenizer lacks become <unk> (default: an error)")
    seq_len: int = option(64, "tokens per row", min=1)
    # batch and loss
    batch_size: int = option(32, "sequences per optimizer step, split over ranks, then --grad-accum", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    mtp_lambda: float = option(0.3, "λ of the MTP loss (V3: 0.3, later 0.1)", min=0)
    bias_gamma: float = option(1e-3, "γ of the aux-loss-free bias update (V3: 0.001; 0 turns it off)", min=0)
    balance_alpha: float | None = option(None, "α of the balance loss (V3: 0.0001; default: aux_loss_alpha)", min=0)
    bf16: bool = option(False, "bf16 autocast on the training device (fp32 master weights)")
    dist_mode: str = option("ddp", "under torchrun", choices=("ddp", "fsdp"))
    # this command's defaults of the shared run and optimizer flags
    steps: int = option(200, "optimizer steps", min=1)
    lr: float = option(3e-3, "peak learning rate", min=0)
    warmup_steps: int = option(10, "linear warm-up steps", min=0)
    lr_schedule: str = option("cosine", "after warm-up", choices=("constant", "linear", "cosine", "wsd"))
    min_lr_ratio: float = option(0.1, "the decay ends at this fraction of --lr", min=0, max=1)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices", min=0)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")


@dataclass(frozen=True, kw_only=True)
class SFTConfig(TrainConfig, DatasetConfig):
    """``nanoseek sft``: the pretrain flags, loss on completion + eos, and rows from a dataset."""

    mode: str = option("sft", "pretrain or sft", choices=("pretrain", "sft"), cli=False)


def build_model_config(cfg: TrainConfig, tok: Tokenizer) -> ModelConfig:
    """Preset or user config.json (strict: unknown keys fail), then overrides; checked against the tokenizer."""
    known = {f.name for f in fields(ModelConfig)} - {"extra"}
    unknown = sorted(set(cfg.overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} in --set; valid keys: {', '.join(sorted(known))}")
    if cfg.model:
        if cfg.overrides or cfg.model_config:
            raise ValueError("--model takes the model config from the checkpoint; drop --set / --model-config")
        config = ModelConfig.load(resolve_model_dir(cfg.model) / "config.json")
    elif cfg.model_config:
        path = Path(cfg.model_config)
        if not path.is_file():
            raise ValueError(f"model config {path} not found: pass a JSON file of ModelConfig fields")
        try:
            config = ModelConfig.from_dict(json.loads(path.read_text()), strict=True)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
    else:
        config = ModelConfig.preset(cfg.preset)
    config = config.replace(**cfg.overrides)
    if tok.vocab_size > config.vocab_size:
        if "vocab_size" in cfg.overrides or cfg.model_config or cfg.model:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{config.vocab_size}; set vocab_size >= {tok.vocab_size}")
        config = config.replace(vocab_size=tok.vocab_size)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}; lower --seq-len or --set max_position_embeddings=N")
    return config


def micro_loss(model: nn.Module, base: Transformer, batch: LMBatch, cfg: TrainConfig, n_tokens: list[int],
               rows_scale: float, use_mtp: bool, router_stats: RouterStats | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed-then-normalised loss of one micro-batch and its parts' sums (ce, mtp_ce_k..., balance) for logging.
    n_tokens[k]: loss tokens of the whole global batch at depth k (0: next token); rows_scale: this micro-batch's
    share of the global batch's sequences (the balance loss is a per-sequence mean); router_stats: filled with
    this forward's expert loads (a fresh one if None)."""
    stats = RouterStats(balance=True) if router_stats is None else router_stats
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        out = model(batch.input_ids, return_mtp=use_mtp, router_stats=stats)
    logits, mtp_logits = out if use_mtp else (out, [])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)  # bf16 autocast: fp32 loss
    ce = F.cross_entropy(logits, batch.targets.view(-1), ignore_index=IGNORE, reduction="sum")
    mtp, mtp_parts = mtp_loss(mtp_logits, batch.targets, n_tokens, cfg.mtp_lambda, len(base.mtp), IGNORE)
    loss = ce / max(n_tokens[0], 1) + mtp
    balance = sum(stats.balance_loss.values(), torch.zeros((), device=logits.device))
    alpha = base.config.aux_loss_alpha if cfg.balance_alpha is None else cfg.balance_alpha
    if alpha > 0:
        loss = loss + alpha * balance * rows_scale
    return loss, torch.stack([p.double() for p in (ce.detach(), *mtp_parts, balance.detach() * rows_scale)])


def train(cfg: TrainConfig) -> dict:
    """Train; returns the run's summary (``nanoseek.train.loop.run_loop``) and "final_loss"."""
    check_ranges(cfg)
    rank, world, device = init_distributed(cfg.device)
    per_rank, rem = divmod(cfg.batch_size, world)
    if rem or per_rank % cfg.grad_accum:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide into {world} rank(s) x --grad-accum "
                         f"{cfg.grad_accum} equal micro-batches")
    micro = per_rank // cfg.grad_accum
    init = resolve_model_dir(cfg.model) if cfg.model else None  # a model directory, or a run directory's latest

    out = Path(cfg.out or f"runs/{cfg.mode}")
    staging = out.with_name(f".{out.name}.data")  # --data files prepared before the run directory is claimed
    shards = Path(cfg.data_dir) if cfg.data_dir else None
    if cfg.data and cfg.mode == "pretrain" and not shards:
        shards = out / "data" if cfg.resume and (out / "data" / "index.json").exists() else staging

    def inputs() -> tuple[Tokenizer, ModelConfig, object]:
        given = cfg.tokenizer or (init if init and (init / "tokenizer.json").exists() else None)
        tok = Tokenizer.load(given) if given else Tokenizer.char()
        if shards == staging:
            if is_main():
                prepare(PrepareConfig(data=cfg.data, out=str(staging), allow_unknown_chars=cfg.allow_unknown_chars,
                                      val_per_mille=20 if cfg.eval_every else 0, workers=1, overwrite=True),
                        tok, sentinels=False)
            barrier()
        if shards and not (cfg.data_dir and given):
            tok = Tokenizer.load(shards)  # the shards' tokenizer; a given one must match it (read_index)
        if cfg.eval_every and not shards:
            raise ValueError("--eval-every needs validation shards: pass --data-dir (nanoseek prepare) or --data")
        config = build_model_config(cfg, tok)
        if isinstance(cfg, SFTConfig) and cfg.dataset:
            return tok, config, SFTData(
                cfg.dataset, tok, cfg.seq_len, cfg.seed, config=cfg.dataset_config, split=cfg.dataset_split,
                prompt_column=cfg.prompt_column, completion_column=cfg.completion_column,
                messages_column=cfg.messages_column, system_prompt=cfg.system_prompt,
                allow_unknown_chars=cfg.allow_unknown_chars)
        tok.chat_template = tok.chat_template if given or cfg.data or shards else RAW_TEMPLATE  # a --task's
        return tok, config, make_data(cfg.mode, tok, cfg.seq_len, cfg.seed, task=cfg.task, files=cfg.data,
                                      allow_unknown_chars=cfg.allow_unknown_chars, data_dir=shards)

    run, (tok, config, data) = start_run(cfg, cfg.mode, inputs)
    if shards == staging:
        if is_main():
            shutil.rmtree(run.dir / "data", ignore_errors=True)
            os.replace(staging, run.dir / "data")
        barrier()
        data = ShardData(run.dir / "data", tok, cfg.seq_len, cfg.seed)
    val = data.validation(cfg.eval_tokens) if cfg.eval_every else None
    torch.manual_seed(cfg.seed)
    model = (Transformer.from_pretrained(init) if init else Transformer(config)).to(device).train()
    depths = len(model.mtp) if cfg.mtp_lambda > 0 else 0  # the MTP depths trained
    state = load_checkpoint(run.resume_from, model) if run.resume_from is not None else {"step": 0}  # before wrap
    fsdp = cfg.dist_mode == "fsdp" and world > 1
    net = wrap_model(model, cfg.dist_mode, find_unused_parameters=len(model.mtp) > depths)
    optimizer = adamw(model, cfg)
    if run.resume_from is not None:  # the optimizer state after wrapping/sharding
        path = run.resume_from / "optimizer.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the checkpoint has no optimizer state to resume from")
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, torch.load(path, weights_only=False),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(torch.load(path, weights_only=False))
        set_rng_state(state["rng"])
    moes = model.moe_layers()
    last_loss = float("nan")
    flops = flops_per_token(model.config, cfg.seq_len)
    peak = world * (cfg.peak_flops or measure_peak_flops(device, torch.bfloat16 if cfg.bf16 else torch.float32))

    def step(n: int, stop: StopFlag) -> tuple[dict, bool]:
        nonlocal last_loss
        t0 = time.perf_counter()
        lr = set_lr(optimizer, lr_at(n - 1, cfg, cfg.steps))
        batch = data.batch(n - 1, cfg.batch_size)  # the global batch; this rank takes its rows
        n_tokens = [int((batch.targets[:, k:] != IGNORE).sum()) for k in range(depths + 1)]
        loads = [torch.zeros(m.gate.n_experts, device=device) for m in moes]
        sums = torch.zeros(depths + 3, dtype=torch.float64, device=device)  # ce, ce_1..D, balance, stop
        optimizer.zero_grad(set_to_none=True)
        for i, lo in enumerate(range(rank * per_rank, (rank + 1) * per_rank, micro)):  # this rank's micro-batches
            mb = batch.rows(slice(lo, lo + micro)).to(device)
            last = i == cfg.grad_accum - 1
            stats = RouterStats(balance=True)
            if fsdp:  # skip the gradient all-reduce on all but the last micro-batch
                net.set_requires_gradient_sync(last)
            no_sync = not last and not fsdp and hasattr(net, "no_sync")
            with net.no_sync() if no_sync else contextlib.nullcontext():
                loss, parts = micro_loss(net, model, mb, cfg, n_tokens, micro / cfg.batch_size, depths > 0, stats)
                (loss * world).backward()  # DDP/FSDP average gradients over ranks; we want their sum
            sums[:-1] += parts
            for load, m in zip(loads, moes):
                load += stats.load.get(m.layer_idx, 0)
        grad_norm = clip_grad_norm(model, cfg.max_grad_norm)
        optimizer.step()
        sums[-1] = float(stop.requested)
        all_reduce_(sums)  # the step's loss sums and whether any rank was asked to stop: one collective
        with torch.no_grad():
            for load, m in zip(loads, moes):
                all_reduce_(load)  # the global batch's expert load, identical on every rank
                update_expert_bias(m.gate, load, cfg.bias_gamma)
        dt = time.perf_counter() - t0
        last_loss = sums[0].item() / max(n_tokens[0], 1)
        tokens = cfg.batch_size * batch.input_ids.shape[1]
        record = {"loss": last_loss, "lr": lr, "grad_norm": grad_norm, "balance_loss": sums[depths + 1].item(),
                  "tokens": n * tokens, "train/tokens_per_s": tokens / dt, "train/flops_per_token": flops,
                  "train/mfu": mfu(tokens / dt, flops, peak)}
        if val is not None and (n % cfg.eval_every == 0 or n == cfg.steps):
            record.update(validate(model, val, data.token_bytes, micro, cfg, rank, world))
        if depths:
            record["mtp_loss"] = sum(sums[k].item() / max(n_tokens[k], 1) for k in range(1, depths + 1)) / depths
        record["expert_load_max_mean"] = [(ld.max() / ld.mean().clamp_min(1e-9)).item() for ld in loads]
        if cfg.sample_every and n % cfg.sample_every == 0 and is_main() and not fsdp:
            record["samples"] = greedy_samples(model.eval(), tok, cfg.sample_prompts, 48)
            model.train()
        return record, sums[-1].item() > 0

    summary = run_loop(run, state["step"], step, lambda n: save(run, n, model, optimizer, tok, {}, fsdp))
    return {**summary, "final_loss": last_loss}


def validate(model: Transformer, val: LMBatch, token_bytes: torch.Tensor, rows: int, cfg: TrainConfig, rank: int,
             world: int) -> dict:
    """val/loss (nats per token) and val/bpb (``nanoseek.data.bits_per_byte``) of the validation rows, each rank
    taking its block of them, ``rows`` at a time."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    per_rank = -(-len(val.input_ids) // world)
    mine = val.rows(slice(rank * per_rank, (rank + 1) * per_rank))
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(mine.input_ids), rows):
            mb = mine.rows(slice(lo, lo + rows))
            nats = micro_loss(model, model, mb.to(device), cfg, [1], 0.0, False)[1][0].item()
            sums += torch.tensor([nats, mb.targets.numel(), token_bytes[mb.targets].sum()], dtype=torch.float64)
    model.train()
    sums = all_reduce_(sums.to(device))
    return {"val/loss": (sums[0] / sums[1]).item(), "val/bpb": bits_per_byte(sums[0].item(), sums[2].item())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_arguments(parser, SFTConfig if parser.prog.split()[-1] == "sft" else TrainConfig)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field (repeatable)")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set num_hidden_layers=4")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def run(args: argparse.Namespace) -> int:
    cls = SFTConfig if args.command == "sft" else TrainConfig
    return cli_args.run_command(train, cli_args.from_args(cls, args, overrides=parse_overrides(args.set)))
