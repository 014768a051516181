"""Pretraining and SFT: one loop, two data modes (``nanoseek pretrain`` / ``nanoseek sft``).

Per optimizer step, over ``grad_accum`` micro-batches of this rank's share of the global batch:

    L = CE(next token) + λ/D Σ_k CE_k (MTP, V3 eq. 24-25) + α Σ_layers L_Bal (V3 eq. 17-20)

each term normalised by its token (or sequence) count over the *global* batch, so the loss and gradients do
not depend on the number of processes or micro-batches. After the AdamW step, outside autograd, every MoE
layer's selection bias moves by b_i += γ·sign(mean_load − load_i) with the load summed over micro-batches and
all-reduced over ranks (V3 §2.1.2, aux-loss-free balancing). Every batch is a function of (seed, step), so a
resumed run continues bit-exactly. Ctrl-C finishes the current step, saves and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nanoseek.config import ModelConfig
from nanoseek.data import IGNORE, Batch, make_data
from nanoseek.distributed import all_reduce_, barrier, cleanup, init_distributed, is_main, wrap_model
from nanoseek.metrics import MetricsLogger
from nanoseek.model.moe import update_expert_bias
from nanoseek.model.transformer import Transformer
from nanoseek.rundir import check_run_dir
from nanoseek.tokenizer import Tokenizer

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class TrainConfig:
    """Everything ``nanoseek pretrain`` / ``nanoseek sft`` accept (the CLI flags map 1:1)."""

    mode: str = "pretrain"  # "pretrain" (all tokens) | "sft" (loss on completion + eos)
    # model: a preset, or a config.json of ModelConfig fields, plus overrides; or a checkpoint to start from
    preset: str = "tiny"
    model_config: str | None = None
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    # data
    task: str | None = "arithmetic"
    data: list[str] = field(default_factory=list)  # .txt / .jsonl files (take precedence over task)
    tokenizer: str | None = None  # a directory with tokenizer.json; default: the character tokenizer
    allow_unknown_chars: bool = False  # characters the tokenizer lacks become <unk> instead of an error
    seq_len: int = 64
    # optimisation
    steps: int = 200
    batch_size: int = 32  # global: split over ranks, then over grad_accum micro-batches
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant"
    decay_frac: float = 0.2  # WSD: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables
    mtp_lambda: float = 0.3  # λ of the MTP loss (V3: 0.3, later 0.1)
    bias_gamma: float = 1e-3  # γ of the aux-loss-free bias update (V3: 0.001); 0 turns it off
    balance_alpha: float = 1e-4  # α of the sequence-wise balance loss (V3: 0.0001)
    bf16: bool = False  # bf16 autocast (fp32 master weights)
    seed: int = 0
    # run directory and checkpoints
    out: str = "runs/pretrain"
    resume: bool = False
    overwrite: bool = False  # delete what --out holds and start over
    ckpt_every: int = 0  # 0: only at the end (and on Ctrl-C)
    keep: int = 3
    stop_at: int | None = None  # stop (and save) after this step, as a preemption would
    dist_mode: str = "ddp"  # "ddp" | "fsdp" under torchrun
    progress: bool = True

    def validate(self) -> None:
        def bad(name: str, rule: str) -> None:
            raise ValueError(f"invalid --{name.replace('_', '-')} {getattr(self, name)!r}: {rule}")

        if self.mode not in ("pretrain", "sft"):
            bad("mode", "must be 'pretrain' or 'sft'")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "keep"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in ("warmup", "ckpt_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("lr", "weight_decay", "grad_clip", "mtp_lambda", "bias_gamma", "balance_alpha"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 < self.decay_frac <= 1:
            bad("decay_frac", "must be in (0, 1]")
        if self.stop_at is not None and self.stop_at < 1:
            bad("stop_at", "must be >= 1")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}")
        if self.dist_mode not in ("ddp", "fsdp"):
            bad("dist_mode", "must be 'ddp' or 'fsdp'")


# ---------------------------------------------------------------------- optimiser and schedule
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (linear weights, experts, gate); none on norms, biases, embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine to min_lr, or WSD: constant, then a linear decay over the last decay_frac."""
    lo = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = cfg.steps - max(1, round(cfg.decay_frac * cfg.steps))
    if step < decay_start:
        return cfg.lr
    return cfg.lr + (lo - cfg.lr) * (step - decay_start + 1) / (cfg.steps - decay_start)


# ---------------------------------------------------------------------- building
def build_tokenizer(cfg: TrainConfig) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").exists():
        return Tokenizer.load(cfg.init_from)
    return Tokenizer.char()


def build_model_config(cfg: TrainConfig, tok: Tokenizer) -> ModelConfig:
    """Preset or user config.json (strict: unknown keys fail), then overrides; checked against the tokenizer."""
    known = {f.name for f in fields(ModelConfig)} - {"extra"}
    unknown = sorted(set(cfg.overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} in --set; valid keys: {', '.join(sorted(known))}")
    if cfg.init_from:
        if cfg.overrides or cfg.model_config:
            raise ValueError("--init-from takes the model config from the checkpoint; drop --set / --model-config")
        config = ModelConfig.load(Path(cfg.init_from) / "config.json")
    elif cfg.model_config:
        path = Path(cfg.model_config)
        if not path.is_file():
            raise ValueError(f"model config {path} not found: pass a JSON file of ModelConfig fields")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        try:
            config = ModelConfig.from_dict(raw, strict=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
    else:
        config = ModelConfig.preset(cfg.preset)
    if cfg.overrides:
        config = config.replace(**cfg.overrides)
    if tok.vocab_size > config.vocab_size:
        if "vocab_size" in cfg.overrides or cfg.model_config or cfg.init_from:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{config.vocab_size}; set vocab_size >= {tok.vocab_size}")
        config = config.replace(vocab_size=tok.vocab_size)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}; lower --seq-len or --set max_position_embeddings=N")
    return config


# ---------------------------------------------------------------------- one step
def micro_loss(model: nn.Module, base: Transformer, batch: Batch, cfg: TrainConfig, n_tokens: list[int],
               rows_scale: float, use_mtp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed-then-normalised loss of one micro-batch and its parts' sums (ce, mtp_ce_k..., balance) for logging.

    n_tokens[k]: loss tokens of the whole global batch at depth k (0: next token); rows_scale: this micro-batch's
    share of the global batch's sequences (the balance loss is a per-sequence mean).
    """
    for moe in base.moe_layers():
        moe.last_load = moe.last_balance_loss = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16 and batch.input_ids.device.type == "cpu"):
        if use_mtp:
            logits, mtp_logits = model(batch.input_ids, return_mtp=True)
        else:
            logits, mtp_logits = model(batch.input_ids), []
    V = logits.shape[-1]
    ce = F.cross_entropy(_fp32(logits).view(-1, V), batch.targets.view(-1), ignore_index=IGNORE, reduction="sum")
    loss = ce / max(n_tokens[0], 1)
    parts = [ce.detach()]
    D = len(base.mtp)
    for k, lk in enumerate(mtp_logits, start=1):  # depth k, row i predicts token i+k+1 = targets[:, i+k]
        ce_k = F.cross_entropy(_fp32(lk).reshape(-1, V), batch.targets[:, k:].reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
        loss = loss + cfg.mtp_lambda / D * ce_k / max(n_tokens[k], 1)
        parts.append(ce_k.detach())
    balance = sum((m.last_balance_loss for m in base.moe_layers() if m.last_balance_loss is not None),
                  torch.zeros((), device=logits.device))
    if cfg.balance_alpha > 0:
        loss = loss + cfg.balance_alpha * balance * rows_scale
    parts.append(balance.detach() * rows_scale)
    return loss, torch.stack([p.double() for p in parts])


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (bf16 autocast gives bf16 logits)."""
    return x if x.dtype == torch.float64 else x.float()


class StopFlag:
    """SIGINT (Ctrl-C) asks the loop to stop after the current step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ---------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> dict:
    """Train; returns {"final_loss", "steps", "wall_time_s", "run_dir", "checkpoint", "resumed_from",
    "interrupted"} (interrupted: Ctrl-C stopped the run after saving)."""
    cfg.validate()
    rank, world, device = init_distributed()
    run_plan = check_run_dir(cfg.out, cfg.mode, resume=cfg.resume, overwrite=cfg.overwrite)
    per_rank, rem = divmod(cfg.batch_size, world)
    if rem or per_rank % cfg.grad_accum:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide into {world} rank(s) x --grad-accum "
                         f"{cfg.grad_accum} equal micro-batches")
    micro = per_rank // cfg.grad_accum
    tok = build_tokenizer(cfg)
    config = build_model_config(cfg, tok)
    data = make_data(cfg.mode, tok, cfg.seq_len, cfg.seed, task=cfg.task, files=cfg.data,
                     allow_unknown_chars=cfg.allow_unknown_chars)
    run_dir = run_plan.create()  # inputs are checked: now claim (or clear) the run directory

    torch.manual_seed(cfg.seed)
    model = Transformer.from_pretrained(cfg.init_from) if cfg.init_from else Transformer(config)
    model.to(device).train()
    use_mtp = len(model.mtp) > 0 and cfg.mtp_lambda > 0
    start, resumed_from = 0, None
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:  # weights before wrapping/sharding; optimizer state after
        state = load_checkpoint(ckpt, model)
        start, resumed_from = state["step"], str(ckpt)
    fsdp = cfg.dist_mode == "fsdp" and world > 1
    net = wrap_model(model, cfg.dist_mode, find_unused_parameters=len(model.mtp) > 0 and not use_mtp)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    if ckpt is not None:
        _load_optimizer(ckpt / "optimizer.pt", model, optimizer, fsdp)
        set_rng_state(state["rng"])
    if is_main():
        (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    logger = MetricsLogger(run_dir, cfg.steps, desc=cfg.mode, enabled=is_main(), start_step=start,
                           progress=cfg.progress)
    moes = model.moe_layers()
    last_loss, step, t_start = float("nan"), start, time.perf_counter()
    depths = len(model.mtp) if use_mtp else 0

    def save(at: int) -> Path | None:
        return _save(run_dir, at, model, optimizer, tok, cfg, fsdp)

    saved, interrupted = None, False
    with StopFlag() as stop:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = data.batch(step, cfg.batch_size)  # the global batch; this rank takes its rows
            n_tokens = [int((batch.targets[:, k:] != IGNORE).sum()) for k in range(depths + 1)]
            loads = [torch.zeros(m.gate.n_experts, device=device) for m in moes]
            sums = torch.zeros(depths + 3, dtype=torch.float64, device=device)  # ce, ce_1..D, balance, stop
            optimizer.zero_grad(set_to_none=True)
            for i in range(cfg.grad_accum):
                lo = rank * per_rank + i * micro
                mb = batch.rows(slice(lo, lo + micro)).to(device)
                last = i == cfg.grad_accum - 1
                with _no_sync(net, fsdp) if not last else contextlib.nullcontext():
                    loss, parts = micro_loss(net, model, mb, cfg, n_tokens, micro / cfg.batch_size, use_mtp)
                    (loss * world).backward()  # DDP/FSDP average gradients over ranks; we want their sum
                sums[:-1] += parts
                for load, m in zip(loads, moes):
                    if m.last_load is not None:
                        load += m.last_load
            grad_norm = _clip(model, cfg.grad_clip)
            optimizer.step()
            sums[-1] = float(stop.requested)
            all_reduce_(sums)
            with torch.no_grad():
                for load, m in zip(loads, moes):
                    all_reduce_(load)  # the global batch's expert load, identical on every rank
                    update_expert_bias(m.gate, load, cfg.bias_gamma)
            dt = time.perf_counter() - t0
            last_loss = sums[0].item() / max(n_tokens[0], 1)
            record = dict(loss=last_loss, lr=lr, grad_norm=grad_norm,
                          tokens_per_s=cfg.batch_size * batch.input_ids.shape[1] / dt,
                          balance_loss=sums[depths + 1].item())
            if depths:
                record["mtp_loss"] = sum(sums[k].item() / max(n_tokens[k], 1) for k in range(1, depths + 1)) / depths
            record["expert_load_max_mean"] = [(ld.max() / ld.mean().clamp_min(1e-9)).item() for ld in loads]
            logger.log(step + 1, **record)
            done = step + 1
            interrupted = sums[-1].item() > 0
            stopping = interrupted or done == cfg.stop_at
            if done == cfg.steps or stopping or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
                saved = save(done)
            if stopping:
                if is_main():
                    print(f"stopped after step {done}; checkpoint {saved}; continue with --resume", file=sys.stderr)
                break
    logger.close()
    if start >= cfg.steps and ckpt is not None:
        saved = ckpt
    return {"final_loss": last_loss, "steps": step + 1 if cfg.steps > start else start,
            "wall_time_s": time.perf_counter() - t_start, "run_dir": str(run_dir),
            "checkpoint": str(saved) if saved else None, "resumed_from": resumed_from, "interrupted": interrupted}


def _no_sync(net: nn.Module, fsdp: bool):
    """Skip the gradient all-reduce on all but the last micro-batch."""
    if fsdp:
        net.set_requires_gradient_sync(False)
        return _restore_sync(net)
    return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(net: nn.Module):
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm.item()


def _save(run_dir: Path, step: int, model: Transformer, optimizer, tok: Tokenizer, cfg: TrainConfig,
          fsdp: bool) -> Path | None:
    """Rank 0 writes the checkpoint (under FSDP every rank first helps gather the full state)."""
    state = {"rng": rng_state(), "data_position": step * cfg.batch_size, "train_config": asdict(cfg)}
    path = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if is_main():
            full = Transformer(model.config)
            full.load_state_dict(model_sd)
            path = save_checkpoint(run_dir, step, full, None, state, keep=cfg.keep, tokenizer=tok)
            torch.save(optim_sd, path / "optimizer.pt")
    elif is_main():
        path = save_checkpoint(run_dir, step, model, optimizer, state, keep=cfg.keep, tokenizer=tok)
    barrier()
    return path


def _load_optimizer(path: Path, model: Transformer, optimizer, fsdp: bool) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the checkpoint has no optimizer state to resume from")
    sd = torch.load(path, weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--preset", default=d.preset, help="model preset (tiny | small | ...)")
    a("--model-config", default=None, help="JSON file of ModelConfig fields (unknown keys are an error)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model config field (repeatable)")
    a("--init-from", default=None, help="checkpoint directory to start from (fine-tuning)")
    a("--task", default=d.task, help="built-in task (default arithmetic); ignored when --data is given")
    a("--data", nargs="+", default=[], help="local .txt / .jsonl files")
    a("--tokenizer", default=None, help="directory with tokenizer.json (default: the character tokenizer)")
    a("--allow-unknown-chars", action="store_true", help="let characters the tokenizer lacks become <unk> "
      "(default: an error listing them)")
    a("--seq-len", type=int, default=d.seq_len)
    a("--steps", type=int, default=d.steps)
    a("--batch-size", type=int, default=d.batch_size, help="global batch (sequences per optimizer step)")
    a("--grad-accum", type=int, default=d.grad_accum)
    a("--lr", type=float, default=d.lr)
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    a("--warmup", type=int, default=d.warmup)
    a("--schedule", choices=SCHEDULES, default=d.schedule)
    a("--decay-frac", type=float, default=d.decay_frac, help="WSD: fraction of steps in the final decay")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--grad-clip", type=float, default=d.grad_clip, help="0 disables")
    a("--mtp-lambda", type=float, default=d.mtp_lambda)
    a("--bias-gamma", type=float, default=d.bias_gamma, help="aux-loss-free bias step γ (0: off)")
    a("--balance-alpha", type=float, default=d.balance_alpha, help="sequence-wise balance loss α")
    a("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    a("--seed", type=int, default=d.seed)
    a("--out", default=None, help="run directory (default runs/<command>)")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint (a new run if "
      "--out is empty)")
    a("--overwrite", action="store_true", help="delete what --out holds and start over")
    a("--ckpt-every", type=int, default=d.ckpt_every, help="save every N steps (0: only at the end)")
    a("--keep", type=int, default=d.keep, help="checkpoints kept")
    a("--stop-at", type=int, default=None, help="stop and save after this step (resume later with --resume)")
    a("--dist-mode", choices=("ddp", "fsdp"), default=d.dist_mode, help="under torchrun")
    a("--no-progress", action="store_true", help="no progress bar")


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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        mode="sft" if args.command == "sft" else "pretrain", preset=args.preset, model_config=args.model_config,
        overrides=parse_overrides(args.set), init_from=args.init_from, task=args.task, data=args.data,
        tokenizer=args.tokenizer, allow_unknown_chars=args.allow_unknown_chars, seq_len=args.seq_len,
        steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        schedule=args.schedule, decay_frac=args.decay_frac, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, mtp_lambda=args.mtp_lambda, bias_gamma=args.bias_gamma,
        balance_alpha=args.balance_alpha, bf16=args.bf16, seed=args.seed, out=args.out or f"runs/{args.command}",
        resume=args.resume, overwrite=args.overwrite, ckpt_every=args.ckpt_every, keep=args.keep, stop_at=args.stop_at,
        dist_mode=args.dist_mode, progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Errors propagate to ``nanoseek.cli.main``, which maps them to exit statuses; 130 after a Ctrl-C save."""
    try:
        summary = train(config_from_args(args))
        if is_main():
            print(json.dumps(summary))
    finally:
        cleanup()
    return 130 if summary["interrupted"] else 0
