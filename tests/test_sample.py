"""``nanoseek sample``: rows of a tiny random model scored by an import-path reward module, ``--keep correct``
keeping exactly the verified rows, chat rendering of conversational prompts, and the output read back as an SFT
dataset."""

import json

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.datasets import load_prompts, task_dataset
from nanoseek.policy import Samples
from nanoseek.rewards import get_reward_fn
from nanoseek.sample import sample_dataset
from nanoseek.tasks import get_task
from nanoseek.tokenizer import Tokenizer

REWARDS = '''
def _text(c):
    return c if isinstance(c, str) else c[0]["content"]

def even(prompts, completions, **kwargs):
    return [float(len(_text(c)) % 2 == 0) for c in completions]

def aligned(prompts, completions, completion_ids, answer, level, **kwargs):
    """1.0 where the row's answer and level columns belong to its prompt ("q<answer>/<level>")."""
    return [float(_text(p if isinstance(p, str) else p[-1]["content"]) == f"q{a}/{lv}" and len(ids) > 0)
            for p, a, lv, ids in zip(prompts, answer, level, completion_ids)]
'''


@pytest.fixture
def checkpoint(tmp_path):
    """A random tiny model with a char tokenizer that stops after a few characters: a constant embedding
    dimension reaches the final norm with one sign, and only the eos row of the LM head reads it."""
    tok = Tokenizer.char()
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).float()
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.eos_id] = 0.0
        model.lm_head.weight[tok.eos_id, 0] = 0.35
    model.save_pretrained(tmp_path / "model")
    tok.save(tmp_path / "model")
    return tmp_path / "model"


def dataset_file(tmp_path):
    rows = [{"prompt": f"q{i}/{i % 3}", "answer": str(i), "level": i % 3} for i in range(4)]
    rows += [{"prompt": [{"role": "user", "content": f"q{i}/{i % 3}"}], "answer": str(i), "level": i % 3}
             for i in range(4, 6)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_cli_keep_all_and_correct(tmp_path, checkpoint, monkeypatch):
    (tmp_path / "rw_sample.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data, rows = dataset_file(tmp_path)
    common = ["sample", "--model", str(checkpoint), "--dataset", str(data), "--num-generations", "4", "--reward-funcs",
              "rw_sample:even", "rw_sample.aligned", "--max-completion-length", "6", "--seed", "3"]
    assert main([*common, "--keep", "all", "--out", str(tmp_path / "all.jsonl")]) == 0
    everything = read(tmp_path / "all.jsonl")
    assert len(everything) == 24
    for n, out in enumerate(everything):
        src = rows[n // 4]
        assert out["sample"] == n % 4 and out["prompt"] == src["prompt"]
        assert (out["answer"], out["level"]) == (src["answer"], src["level"])
        text = out["completion"] if isinstance(src["prompt"], str) else out["completion"][0]["content"]
        if not isinstance(src["prompt"], str):
            assert out["completion"] == [{"role": "assistant", "content": text}]
        assert out["rewards"] == {"even": float(len(text) % 2 == 0), "aligned": 1.0}
        assert out["reward"] == out["rewards"]["even"] + 1.0
    assert {o["truncated"] for o in everything} == {True, False}
    assert {o["rewards"]["even"] for o in everything} == {0.0, 1.0}

    assert main([*common, "--keep", "correct", "--out", str(tmp_path / "correct.jsonl")]) == 0
    kept = read(tmp_path / "correct.jsonl")
    assert kept == [o for o in everything if o["rewards"]["even"] == 1.0 and not o["truncated"]]
    assert 0 < len(kept) < 24

    sft = load_prompts(tmp_path / "correct.jsonl", require_completion=True)  # the output is an SFT dataset
    tok = Tokenizer.load(checkpoint)
    for row, out in zip(sft.rows, kept):
        prompt, completion, add_eos = tok.sft_texts(row.prompt, row.completion)
        if isinstance(out["prompt"], str):
            assert (prompt, completion, add_eos) == (out["prompt"], out["completion"], True)
        else:
            assert prompt == f"User: {out['prompt'][0]['content']}\nAssistant: "
            assert (completion, add_eos) == (out["completion"][0]["content"] + "<eos>", False)


class ScriptedPolicy:
    """Answers each prompt from a script (completion text per prompt), recording the prompt ids it was given."""

    eos_id = Tokenizer.char().eos_id

    def __init__(self, tok, script):
        self.tok, self.script, self.seen = tok, script, []

    def sample(self, prompt_ids, params, seed=None):
        self.seen += prompt_ids
        texts = [self.script[self.tok.decode(p)] for p in prompt_ids]
        n = params.max_tokens
        ids = [self.tok.encode(t)[:n] + ([self.eos_id] if len(t) < n else []) for t in texts]
        return Samples(ids, [[0.0] * len(c) for c in ids], [len(t) >= n for t in texts])


def test_keep_correct_with_math_and_format_on_gsm8k():
    tok = Tokenizer.char()
    task = get_task("gsm8k")
    ds = task_dataset(task, 3, "eval", seed=0)
    a, b, c = ds.rows
    system = "Solve it."
    render = tok.template().render
    texts = [render([{"role": "user", "content": r.prompt}], system_prompt=system) for r in ds.rows]
    script = {texts[0]: a.completion,  # right answer, right format: kept
              texts[1]: f"#### {b.answer}",  # right answer, no worked lines: format fails
              texts[2]: c.completion.rsplit("####", 1)[0] + f"#### {int(c.answer) + 1}"}  # wrong answer
    policy = ScriptedPolicy(tok, script)
    fns = [get_reward_fn("math"), get_reward_fn("format_gsm8k")]
    rows, summary = sample_dataset(policy, tok, ds, fns, num_generations=2, max_completion_length=200,
                                   system_prompt=system, keep="correct")
    assert policy.seen == [tok.encode(t, add_bos=True) for t in texts for _ in range(2)]
    assert [r["completion"][0]["content"] for r in rows] == [a.completion] * 2
    assert rows[0]["prompt"] == [{"role": "system", "content": system}, {"role": "user", "content": a.prompt}]
    assert rows[0]["rewards"] == {"math_reward": 1.0, "gsm8k_format_reward": 1.0} and rows[0]["answer"] == a.answer
    assert (summary["samples"], summary["kept"], summary["prompts_kept"]) == (6, 2, 1)
    assert summary["rewards/math_reward/mean"] == pytest.approx(2 / 3)
    # a completion cut off at max_new_tokens is never kept, even with full rewards
    rows, _ = sample_dataset(policy, tok, ds, fns, num_generations=1, max_completion_length=len(a.completion),
                             system_prompt=system)
    assert rows == []


def test_task_cli_and_errors(tmp_path, checkpoint, capsys):
    out = tmp_path / "task.jsonl"
    assert main(["sample", "--model", str(checkpoint), "--task", "arithmetic", "--num-prompts", "3",
                 "--num-generations", "2", "--keep", "all", "--max-completion-length", "4", "--out", str(out)]) == 0
    rows = read(out)
    assert len(rows) == 6 and all(set(r["rewards"]) == {"arithmetic_reward"} for r in rows)
    assert all(r["answer"] == str(eval(r["prompt"][:-1])) for r in rows)  # noqa: S307 - "37+48=" from the task
    from nanoseek.datasets import load_prompts  # what `nanoseek sft --data FILE.jsonl` reads

    sft = load_prompts(out, require_completion=True).rows
    assert [(r.prompt, r.completion) for r in sft] == [(r["prompt"], r["completion"]) for r in rows]

    assert main(["sample", "--model", str(checkpoint), "--task", "arithmetic", "--reward-funcs", "countdown",
                 "--out", str(out)]) == 2
    assert "countdown_reward needs the column 'numbers', which dataset arithmetic[train] lacks" in \
        capsys.readouterr().err
    data, _ = dataset_file(tmp_path)
    assert main(["sample", "--model", str(checkpoint), "--dataset", str(data), "--out", str(out)]) == 2
    assert "--keep correct needs reward functions" in capsys.readouterr().err
    assert main(["sample", "--model", str(checkpoint), "--dataset", str(data), "--reward-funcs", "nope.mod:f",
                 "--out", str(out)]) == 2
    assert "no module 'nope.mod'" in capsys.readouterr().err
    assert main(["sample", "--model", str(checkpoint), "--out", str(out)]) == 2  # neither --dataset nor --task
    assert "give one of --dataset or --task" in capsys.readouterr().err
    assert main(["sample", "--model", str(checkpoint), "--task", "arithmetic", "--num-generations", "0",
                 "--out", str(out)]) == 2
    assert "--num-generations 0: must be >= 1" in capsys.readouterr().err


def test_hf_llama_with_chat_template(tmp_path, monkeypatch):
    """A tiny transformers Llama whose tokenizer (built here) has a Llama-2 chat template: prompts are rendered
    with it, its own <s> is not doubled, and the sampler runs through Policy's Hugging Face path."""
    transformers = pytest.importorskip("transformers")
    from test_chat import LLAMA_TEMPLATE
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    from nanoseek.policy import Policy

    words = ["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "hi", "there", "you", "<<SYS>>", "<</SYS>>"]
    raw = HFTok(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = LLAMA_TEMPLATE
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi there"}]}) + "\n")
    seen = []
    sample = Policy.sample
    monkeypatch.setattr(Policy, "sample", lambda self, ids, *a, **k: seen.extend(ids) or sample(self, ids, *a, **k))
    out = tmp_path / "out.jsonl"
    assert main(["sample", "--model", str(tmp_path / "llama"), "--dataset", str(data), "--num-generations", "3",
                 "--keep", "all", "--max-completion-length", "5", "--system-prompt", "you", "--out", str(out)]) == 0
    expected = tok.apply_chat_template([{"role": "system", "content": "you"}, {"role": "user", "content": "hi there"}],
                                       tokenize=False, add_generation_prompt=True)
    assert expected == "<s>[INST] <<SYS>>\nyou\n<</SYS>>\n\nhi there [/INST]"
    assert seen == [tok.encode(expected, add_special_tokens=False)] * 3 and seen[0][:2] == [1, 4]
    rows = read(out)
    assert len(rows) == 3 and rows[0]["prompt"][0] == {"role": "system", "content": "you"}
