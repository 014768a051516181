"""GRPO end to end: the policy interface (chunked completion log-probs, rollouts) on nanoseek and Hugging Face
models, a learning run on the built-in arithmetic task, the CLI on a tiny random Llama, and resume."""

import json
import math

import pytest
import torch
from builders import batch_from_rows

from nanoseek import ModelConfig, Transformer
from nanoseek.metrics import read_metrics
from nanoseek.policy import Batch, Policy, SamplingParams
from nanoseek.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def tiny_nanoseek(vocab: int = 100) -> Transformer:
    return Transformer(ModelConfig.preset("tiny", vocab_size=vocab, initializer_range=0.2)).float()


def tiny_llama(vocab: int = 100):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def reference_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False):
    """Full-vocabulary logits of the whole batch, then log_softmax and gather: what the chunked path avoids."""
    ids = batch.sequences(pad_id=0)
    logits = model(ids) if isinstance(model, Transformer) else model(input_ids=ids).logits
    logp = (logits.float() / temperature).log_softmax(-1)
    B, L = batch.completion_ids.shape
    out, ent = torch.zeros(B, L), torch.zeros(B, L)
    for i in range(B):
        p = int(batch.prompt_lens[batch.prompt_index[i]])
        for t in range(int(batch.completion_mask[i].sum())):
            out[i, t] = logp[i, p + t - 1, batch.completion_ids[i, t]]
            ent[i, t] = -(logp[i, p + t - 1].exp() * logp[i, p + t - 1]).sum().detach()
    return (out, ent) if with_entropy else out


@pytest.mark.parametrize("kind", ["nanoseek", "llama"])
def test_completion_logprobs_match_full_logits(kind):
    torch.manual_seed(0)
    model = tiny_nanoseek() if kind == "nanoseek" else tiny_llama()
    policy = Policy(model, pad_id=0, eos_id=2)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 10, 11]]
    completions = [[20, 21, 2], [30, 31, 32, 33, 34], [40]]
    batch = batch_from_rows(prompts, completions, pad_id=0)
    assert batch.completion_ids.shape == (3, 5) and batch.completion_mask.sum(1).tolist() == [3, 5, 1]
    want, want_ent = reference_logprobs(model, batch, temperature=0.7, with_entropy=True)
    got, ent = policy.completion_logprobs(batch, temperature=0.7, chunk_tokens=2, entropy=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[batch.completion_mask == 0] == 0).all()
    assert (ent[batch.completion_mask == 1] > 0).all() and (ent[batch.completion_mask == 0] == 0).all()
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    assert not ent.requires_grad
    # gradients through the checkpointed chunks equal those of the full computation
    w = torch.randn(3, 5) * batch.completion_mask
    (got * w).sum().backward()
    g_chunk = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (reference_logprobs(model, batch, temperature=0.7) * w).sum().backward()
    g_full = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert g_chunk.keys() == g_full.keys() and len(g_full) > 10
    for n in g_full:
        torch.testing.assert_close(g_chunk[n], g_full[n], rtol=1e-4, atol=1e-5)


def test_hf_rollout_ends_at_eos_or_length():
    policy = Policy(tiny_llama(), pad_id=0, eos_id=2)
    params = SamplingParams(max_tokens=6, temperature=1.0)
    outs = policy.sample([[1, 5], [1, 6, 7, 8]] * 4, params, seed=3).completions
    assert len(outs) == 8
    for o in outs:
        assert 1 <= len(o) <= 6 and (2 not in o[:-1]) and (len(o) == 6 or o[-1] == 2)
    assert outs == policy.sample([[1, 5], [1, 6, 7, 8]] * 4, params, seed=3).completions


# ---------------------------------------------------------------------- the trainer


TASK = {"max_operand": 4, "ops": "+"}  # single-digit sums: learnable in seconds


def sft_checkpoint(directory, steps: int = 30, seed: int = 0):
    """A tiny nanoseek model SFT'd briefly on the task (loss on completion + eos), saved with its tokenizer."""
    import random

    from nanoseek.tasks import examples, get_task

    torch.manual_seed(seed)
    tok = Tokenizer.char()
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
    exs = examples(get_task("arithmetic", **TASK), 500, "train", seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = random.Random(step).sample(exs, 32)
        prompts = [tok.encode(e.prompt, add_bos=True) for e in rows]
        batch = batch_from_rows(prompts, [tok.encode(e.completion, add_eos=True) for e in rows], tok.pad_id)
        logp, _ = Policy(model, tok.pad_id, tok.eos_id).completion_logprobs(batch)
        loss = -(logp * batch.completion_mask).sum() / batch.completion_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


def test_grpo_learns_arithmetic(tmp_path):
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    model_dir = sft_checkpoint(tmp_path / "sft")
    cfg = GRPOConfig(model=str(model_dir), out=str(tmp_path / "run"), task_kwargs=TASK, num_generations=8,
                     prompts_per_step=16, max_completion_length=4, steps=30, lr=1e-3, num_iterations=2,
                     progress=False)
    summary = train_grpo(cfg)
    r = [m["reward"] for m in read_metrics(tmp_path / "run")]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert summary["steps"] == 30 and len(r) == 30
    assert last > first + 0.15, (first, last, r)


def test_cli_tiny_llama_with_resume(tmp_path):
    from nanoseek.cli import main

    model_dir = tmp_path / "llama"
    tiny_llama(Tokenizer.char().vocab_size).save_pretrained(model_dir)
    Tokenizer.char().save(model_dir)
    out = tmp_path / "run"
    argv = ["grpo", "--model", str(model_dir), "--task", "arithmetic", "--num-generations", "4",
            "--prompts-per-step", "2", "--max-completion-length", "5", "--beta", "0.04", "--lr", "1e-4",
            "--out", str(out), "--no-progress", "--log-completions-every", "1"]
    assert main(argv + ["--steps", "2"]) == 0
    assert main(argv + ["--steps", "3", "--resume"]) == 0
    ms = read_metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3]
    for m in ms:
        for key in ("reward", "step_time", "reward_std", "frac_reward_zero_std", "kl", "entropy",
                    "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length",
                    "completions/clipped_ratio", "tokens_per_s", "rewards/arithmetic_reward/mean"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        assert m["clip_ratio/low_mean"] == 0 and m["clip_ratio/high_mean"] == 0  # μ = 1: ratio is exactly 1
    assert (out / "checkpoints" / "step_00000003").is_dir()
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 3} and all("reward" in s for s in samples)


def test_resume_is_exact(tmp_path):
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    model_dir = sft_checkpoint(tmp_path / "sft", steps=10)
    kw = dict(model=str(model_dir), task_kwargs=TASK, num_generations=4, prompts_per_step=4,
              max_completion_length=4, lr=1e-3, beta=0.05, ref_reset_every=2, num_iterations=2,
              num_minibatches=2, progress=False)
    train_grpo(GRPOConfig(out=str(tmp_path / "a"), steps=4, **kw))
    train_grpo(GRPOConfig(out=str(tmp_path / "b"), steps=2, **kw))
    train_grpo(GRPOConfig(out=str(tmp_path / "b"), steps=4, resume=True, **kw))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        assert ma["reward"] == mb["reward"] and ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    wa = Transformer.from_pretrained(tmp_path / "a" / "checkpoints" / "step_00000004").state_dict()
    wb = Transformer.from_pretrained(tmp_path / "b" / "checkpoints" / "step_00000004").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
    from types import SimpleNamespace

    from nanoseek.rewards import RewardResult
    from nanoseek.train.grpo import GRPO, GRPOConfig
    from nanoseek.train.optimize import OptimizeStats
    from nanoseek.train.rl import RLTrainer

    model_dir = sft_checkpoint(tmp_path / "sft", steps=5)
    tok = Tokenizer.load(model_dir)
    cfg = GRPOConfig(model=str(model_dir), task_kwargs=TASK, num_generations=2, prompts_per_step=3,
                     max_completion_length=2, dynamic_sampling=True, max_resample_rounds=2)
    trainer = RLTrainer(cfg, Policy.load(model_dir, tok.pad_id, tok.eos_id), tok, GRPO)
    # rounds of 3 groups: round 0 -> one informative group, round 1 -> one, round 2 -> two (only one needed)
    scripted = iter([[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 1]])

    def outcome(examples, texts, completion_ids=None):
        r = [float(x) for x in next(scripted)]
        return RewardResult(r, {"scripted": r})

    trainer.scorer = SimpleNamespace(outcome=outcome, process_fn=None, names=["scripted"])
    rollout, seen = trainer.collect(1)
    assert rollout.rewards.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert rollout.batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert (seen.zero_std_groups, seen.groups) == (5, 9)
    rollout = trainer.algorithm.prepare(rollout, 1, OptimizeStats())
    assert (rollout.advantages.view(-1, 2).std(1) > 0).all()


DIST_HEADER = """
import sys, torch
from nanoseek.distributed import init_distributed
from nanoseek.policy import Policy
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPO, GRPOConfig
from nanoseek.train.rl import RLTrainer
torch.set_num_threads(1)
rank, world, _ = init_distributed()
model_dir, out = sys.argv[1], sys.argv[2]
tok = Tokenizer.load(model_dir)
"""  # a torchrun script's common start (run by run_two_ranks); each test appends its config and what it saves

DIST_SCRIPT = DIST_HEADER + """
cfg = GRPOConfig(model=model_dir, task_kwargs={"max_operand": 4, "ops": "+"}, num_generations=4, prompts_per_step=4,
                 max_completion_length=3, lr=1e-3, beta=0.05, num_iterations=2)
trainer = RLTrainer(cfg, Policy.load(model_dir, tok.pad_id, tok.eos_id), tok, GRPO, rank, world)
prompts = [ex.prompt for ex in trainer.prompts(1)]
metrics = [trainer.step(s)[0] for s in (1, 2)]
torch.save({"prompts": prompts, "metrics": metrics, "weights": trainer.policy.model.state_dict()}, f"{out}/{rank}.pt")
"""


def run_two_ranks(script_text: str, model_dir, tmp_path) -> tuple[dict, dict]:
    """Run ``script_text MODEL_DIR OUT`` under torchrun with 2 CPU processes; return what ranks 0 and 1 saved, after
    checking that both issued the same collectives."""
    import os
    import socket
    import subprocess
    import sys

    from builders import DUMP_COLLECTIVES, FLIGHT_RECORDER_ENV, same_collectives

    script = tmp_path / "dist_script.py"
    script.write_text(script_text + DUMP_COLLECTIVES + 'dump_collectives(f"{out}/collectives_{rank}.json")\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), str(model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **FLIGHT_RECORDER_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_collectives(tmp_path / "collectives_0.json", tmp_path / "collectives_1.json")
    return torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")


def test_torchrun_two_ranks(tmp_path):
    from nanoseek.tasks import examples, get_task

    model_dir = sft_checkpoint(tmp_path / "sft", steps=5)
    r0, r1 = run_two_ranks(DIST_SCRIPT, model_dir, tmp_path)
    # prompts sharded: the two halves are disjoint and together the step's P prompts
    want = [ex.prompt for ex in examples(get_task("arithmetic", **TASK), 4, "train", seed=(0 * 1_000_003 + 0) * 101)]
    assert r0["prompts"] + r1["prompts"] == want and len(r0["prompts"]) == 2
    # gradients all-reduced: both ranks hold the same weights; metrics gathered: both report the same numbers
    for k in r0["weights"]:
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k], rtol=0, atol=0)
    for m0, m1 in zip(r0["metrics"], r1["metrics"]):
        for k in ("reward", "reward_std", "kl", "entropy", "completions/mean_length"):
            assert m0[k] == pytest.approx(m1[k]), k


def test_any_hf_tokenizer_without_nanoseek_specials(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    from nanoseek.train.grpo import GRPOConfig, train_grpo

    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "?"] + [chr(i) for i in range(32, 127)])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="?"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    raw.decoder = decoders.Fuse()
    model_dir = tmp_path / "llama"
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>").save_pretrained(model_dir)
    tiny_llama(len(vocab)).save_pretrained(model_dir)
    tok = Tokenizer.load(model_dir)
    # transformers adds no BOS for this tokenizer (no post-processor), and neither does nanoseek
    assert isinstance(tok, Tokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 1, 1)
    assert tok.encode("1+2=", add_bos=True) == [vocab["1"], vocab["+"], vocab["2"], vocab["="]]
    train_grpo(GRPOConfig(model=str(model_dir), out=str(tmp_path / "run"), num_generations=2, prompts_per_step=2,
                          max_completion_length=3, steps=1, progress=False))
    assert read_metrics(tmp_path / "run")[0]["step"] == 1


def test_lr_schedules_hand_values():

    from nanoseek.train.grpo import GRPOConfig
    from nanoseek.train.schedule import OptimConfig, lr_at

    def lrs(schedule: str) -> list[float]:  # what the RL trainer sets at 1-based step s: lr_at(s - 1, ...)
        cfg = OptimConfig(lr=1.0, warmup_steps=2, lr_schedule=schedule)
        return [lr_at(s, cfg, 10) for s in (0, 1, 2, 6, 9)]

    assert lrs("constant") == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert lrs("linear") == pytest.approx([0.5, 1.0, 1.0, 0.5, 1 / 8])  # decay over the 8 steps after warm-up
    assert lrs("cosine") == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 7 / 8))])
    with pytest.raises(ValueError, match="lr-schedule"):
        GRPOConfig(model="unused", lr_schedule="step").validate()
