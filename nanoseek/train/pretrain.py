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
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nanoseek.config import ModelConfig
from nanoseek.data import IGNORE, DatasetData, LMBatch, make_data
from nanoseek.distributed import all_reduce_, barrier, init_distributed, is_main, wrap_model
from nanoseek.metrics import MetricsLogger
from nanoseek.model.moe import RouterStats, update_expert_bias
from nanoseek.model.mtp import mtp_loss
from nanoseek.model.transformer import Transformer
from nanoseek.rundir import check_run_dir
from nanoseek.tokenizer import Tokenizer
from nanoseek import cli_args
from nanoseek.cli_args import check_ranges, option
from nanoseek.train.interrupt import StopFlag
from nanoseek.train.schedule import SCHEDULES
from nanoseek.train.schedule import lr_at as schedule_lr


@dataclass
class TrainConfig:
    """Everything ``nanoseek pretrain`` / ``nanoseek sft`` accept (the CLI flags are generated from the fields)."""

    mode: str = option("pretrain", "pretrain (loss on all tokens) or sft (loss on completion + eos)",
                       choices=("pretrain", "sft"), cli=False)
    # model: a preset, or a config.json of ModelConfig fields, plus overrides; or a checkpoint to start from
    preset: str = option("tiny", "model preset (tiny | small | deepseek-v2-lite | deepseek-v2 | deepseek-v3)")
    model_config: str | None = option(None, "JSON file of ModelConfig fields (unknown keys are an error)")
    overrides: dict = option(default_factory=dict, help="model config fields to override", cli=False)  # --set
    init_from: str | None = option(None, "checkpoint directory to start from (fine-tuning)")
    # data
    task: str | None = option("arithmetic", "built-in task; ignored when --data is given")
    data: list[str] = option(default_factory=list, help="local .txt / .jsonl files (take precedence over --task)")
    dataset: str | None = option(None, "sft: a dataset of prompt + completion or messages rows (local "
                                 ".jsonl/.json/.parquet/.csv file or folder, or a hub dataset; `nanoseek sample` "
                                 "output works); conversations use the tokenizer's chat template")
    dataset_config: str | None = option(None, "the hub dataset's configuration")
    dataset_split: str = option("train", "the split to read (hub datasets; folders of split-named files)")
    prompt_column: str = option("prompt", "--dataset: the column with the prompts")
    completion_column: str = option("completion", "--dataset: the column with the completions (the SFT targets)")
    messages_column: str = option("messages", "--dataset: the column with whole conversations")
    system_prompt: str | None = option(None, "--dataset: system message for every row (rendered with the chat "
                                       "template)")
    tokenizer: str | None = option(None, "directory with tokenizer.json (default: the character tokenizer)")
    allow_unknown_chars: bool = option(False, "let characters the tokenizer lacks become <unk> (default: an error "
                                       "listing them)")
    seq_len: int = option(64, "tokens per row", min=1)
    # optimisation
    steps: int = option(200, "optimizer steps", min=1)
    batch_size: int = option(32, "global batch: sequences per optimizer step, split over ranks, then over "
                             "--grad-accum micro-batches", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(3e-3, "peak learning rate", min=0)
    min_lr_ratio: float = option(0.1, "the decay ends at this fraction of --lr", min=0, max=1)
    warmup: int = option(10, "linear warm-up steps", min=0)
    schedule: str = option("cosine", "after warm-up", choices=SCHEDULES)
    decay_frac: float = option(0.2, "WSD: the last fraction of steps decays linearly to the minimum", gt=0, max=1)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices", min=0)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    grad_clip: float = option(1.0, "gradient clipping norm (0 disables)", min=0)
    mtp_lambda: float = option(0.3, "λ of the MTP loss (V3: 0.3, later 0.1)", min=0)
    bias_gamma: float = option(1e-3, "γ of the aux-loss-free bias update (V3: 0.001; 0 turns it off)", min=0)
    balance_alpha: float | None = option(None, "α of the sequence-wise balance loss (V3: 0.0001; default: the "
                                          "model config's aux_loss_alpha)", min=0)
    bf16: bool = option(False, "bf16 autocast on the training device (fp32 master weights)")
    seed: int = option(0, "seed of the model init and the data order")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)")
    # run directory and checkpoints
    out: str | None = option(None, "run directory (default runs/<command>)")
    resume: bool = option(False, "continue the run in --out from its latest checkpoint (a new run if --out is "
                          "empty)")
    overwrite: bool = option(False, "delete what --out holds and start over")
    ckpt_every: int = option(0, "save every N steps (0: only at the end and on Ctrl-C)", min=0)
    keep: int = option(3, "checkpoints kept", min=1)
    stop_at: int | None = option(None, "stop and save after this step, as a preemption would (then --resume)",
                                 min=1)
    dist_mode: str = option("ddp", "under torchrun", choices=("ddp", "fsdp"))
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> None:
        check_ranges(self)


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
    return schedule_lr(step, cfg.lr, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)


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
def micro_loss(model: nn.Module, base: Transformer, batch: LMBatch, cfg: TrainConfig, n_tokens: list[int],
               rows_scale: float, use_mtp: bool, router_stats: RouterStats | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed-then-normalised loss of one micro-batch and its parts' sums (ce, mtp_ce_k..., balance) for logging.

    n_tokens[k]: loss tokens of the whole global batch at depth k (0: next token); rows_scale: this micro-batch's
    share of the global batch's sequences (the balance loss is a per-sequence mean); router_stats: filled with
    this forward's expert loads (a fresh one if None).
    """
    stats = RouterStats(balance=True) if router_stats is None else router_stats
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        if use_mtp:
            logits, mtp_logits = model(batch.input_ids, return_mtp=True, router_stats=stats)
        else:
            logits, mtp_logits = model(batch.input_ids, router_stats=stats), []
    V = logits.shape[-1]
    ce = F.cross_entropy(_fp32(logits).view(-1, V), batch.targets.view(-1), ignore_index=IGNORE, reduction="sum")
    loss = ce / max(n_tokens[0], 1)
    parts = [ce.detach()]
    mtp, mtp_parts = mtp_loss(mtp_logits, batch.targets, n_tokens, cfg.mtp_lambda, len(base.mtp), IGNORE)
    loss = loss + mtp
    parts += mtp_parts
    balance = sum(stats.balance_loss.values(), torch.zeros((), device=logits.device))
    alpha = base.config.aux_loss_alpha if cfg.balance_alpha is None else cfg.balance_alpha
    if alpha > 0:
        loss = loss + alpha * balance * rows_scale
    parts.append(balance.detach() * rows_scale)
    return loss, torch.stack([p.double() for p in parts])


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (bf16 autocast gives bf16 logits)."""
    return x if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> dict:
    """Train; returns {"final_loss", "steps", "wall_time_s", "run_dir", "checkpoint", "resumed_from",
    "interrupted" (Ctrl-C stopped it)}."""
    cfg.validate()
    rank, world, device = init_distributed(cfg.device)
    run_plan = check_run_dir(cfg.out or f"runs/{cfg.mode}", cfg.mode, resume=cfg.resume, overwrite=cfg.overwrite)
    per_rank, rem = divmod(cfg.batch_size, world)
    if rem or per_rank % cfg.grad_accum:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide into {world} rank(s) x --grad-accum "
                         f"{cfg.grad_accum} equal micro-batches")
    micro = per_rank // cfg.grad_accum
    tok = build_tokenizer(cfg)
    config = build_model_config(cfg, tok)
    if cfg.dataset:
        if cfg.mode != "sft":
            raise ValueError("--dataset holds SFT rows (prompt + completion or messages); pretrain reads --data")
        data = DatasetData(cfg.dataset, tok, cfg.seq_len, cfg.seed, config=cfg.dataset_config,
                           split=cfg.dataset_split, prompt_column=cfg.prompt_column,
                           completion_column=cfg.completion_column, messages_column=cfg.messages_column,
                           system_prompt=cfg.system_prompt, allow_unknown_chars=cfg.allow_unknown_chars)
    else:
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
                stats = RouterStats(balance=True)
                with _no_sync(net, fsdp) if not last else contextlib.nullcontext():
                    loss, parts = micro_loss(net, model, mb, cfg, n_tokens, micro / cfg.batch_size, use_mtp, stats)
                    (loss * world).backward()  # DDP/FSDP average gradients over ranks; we want their sum
                sums[:-1] += parts
                for load, m in zip(loads, moes):
                    if m.layer_idx in stats.load:
                        load += stats.load[m.layer_idx]
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
            "checkpoint": str(saved) if saved else None, "resumed_from": resumed_from,
            "interrupted": interrupted}


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
    cli_args.add_arguments(parser, TrainConfig)
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return cli_args.from_args(TrainConfig, args, mode="sft" if args.command == "sft" else "pretrain",
                              overrides=parse_overrides(args.set))


def run(args: argparse.Namespace) -> int:
    return cli_args.run_command(train, config_from_args(args))
