"""Where an RL run's prompts, rewards and held-out prompts come from: a built-in task (fresh problems every step,
the task's own reward first) or a dataset (``--dataset``: seeded epochs, ``--reward-funcs`` only), behind one
interface (``batch``, ``columns``). A reward function that needs a column the prompts lack is refused at start."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from nanoseek.cli_args import option
from nanoseek.datasets import PromptDataset, TaskPrompts, load_prompts, task_dataset
from nanoseek.rewards import RewardFlags, RewardFn, check_reward_columns, get_reward_fn
from nanoseek.tasks import get_task, task_reward


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """A dataset of prompt (+ completion) or whole-conversation rows, and the columns to read (RL and SFT)."""

    dataset: str | None = option(None, "a local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset")
    dataset_config: str | None = option(None, "the hub dataset's configuration")
    dataset_split: str = option("train", "the split to read (hub datasets; folders of split-named files)")
    prompt_column: str = option("prompt", "the column with the prompts (strings or chat messages)")
    completion_column: str = option("completion", "the column with the completions (SFT targets)")
    messages_column: str = option("messages", "the column with whole conversations (prompt = all but the reply)")
    system_prompt: str | None = option(None, "system message for every prompt (rendered with the chat template)")


@dataclass(frozen=True, kw_only=True)
class RLDataConfig(DatasetConfig, RewardFlags):
    """Where the prompts, rewards and held-out prompts come from (--dataset: rewards from --reward-funcs only)."""

    task: str = option("arithmetic", "built-in task giving prompts and the task reward (unless --dataset)")
    task_kwargs: dict = option(default_factory=dict, help='task options as JSON, e.g. \'{"max_operand": 9}\'')
    answer_column: str | None = option(None, "the column with the gold answers, given to rewards as `answer`")
    reward_funcs: list[str] = option(default_factory=list, help="reward functions: built-in names (math, format, "
                                     "format_gsm8k, equations, countdown, code) or import paths (package.module:fn)")
    reward_weights: list[float] = option(default_factory=list, help="weights: the task reward first (without "
                                         "--dataset), then each of --reward-funcs (default all 1)")
    eval_every: int = option(0, "evaluate on held-out prompts every N steps and at the end (0: never)", min=0)
    eval_dataset: str | None = option(None, "held-out prompts (default: the task's, or 1 in 10 of --dataset's)")
    eval_split: str | None = option(None, "--eval-dataset's split (default: train for a file, else test)")
    eval_n: int = option(200, "most held-out prompts evaluated", min=1)


@dataclass(frozen=True)
class RLData:
    """reward_fns: the outcome rewards in weight order; correct: the functions that decide in evaluation whether a
    completion is correct (a task's own reward, else every reward function)."""

    train: PromptDataset | TaskPrompts
    held_out: PromptDataset | None
    reward_fns: list[RewardFn]
    correct: list[RewardFn]


def rl_data(cfg: RLDataConfig, tokenizer) -> RLData:
    """The prompts, held-out prompts and reward functions a run's data flags describe."""
    extra = [get_reward_fn(n) for n in cfg.reward_funcs]
    load = partial(load_prompts, config=cfg.dataset_config, prompt_column=cfg.prompt_column,
                   answer_column=cfg.answer_column, completion_column=cfg.completion_column,
                   messages_column=cfg.messages_column)
    held_out = None
    if cfg.dataset:
        if not extra:
            raise ValueError("--dataset has no task reward: give --reward-funcs (e.g. math, package.module:function)")
        train = load(cfg.dataset, split=cfg.dataset_split)
        fns, correct = extra, extra
        if cfg.eval_every and not cfg.eval_dataset:
            train, held_out = train.split(10)  # one prompt in 10 held out of training
    else:
        task = get_task(cfg.task, **cfg.task_kwargs)
        train, own = TaskPrompts(task), task_reward(task)
        fns, correct = [own, *extra], [own]
        if cfg.eval_every and not cfg.eval_dataset:
            held_out = task_dataset(task, cfg.eval_n, "eval", seed=0)
    if cfg.eval_every and cfg.eval_dataset:
        split = cfg.eval_split or ("train" if Path(cfg.eval_dataset).expanduser().is_file() else "test")
        held_out = load(cfg.eval_dataset, split=split)
        check_reward_columns(fns, held_out.columns, f"--eval-dataset {cfg.eval_dataset}")
    if held_out is not None and len(held_out) > cfg.eval_n:
        held_out = PromptDataset(held_out.name, held_out.rows[: cfg.eval_n], held_out.columns)
    if cfg.reward_weights and len(cfg.reward_weights) != len(fns):
        raise ValueError(f"--reward-weights: {len(cfg.reward_weights)} given, need {len(fns)} ("
                         f"{'' if cfg.dataset else 'the task reward, then '}each of --reward-funcs)")
    check_reward_columns(fns, train.columns, train.name if cfg.dataset is None else f"--dataset {cfg.dataset}")
    rows = [*getattr(train, "rows", ()), *(held_out.rows if held_out is not None else ())]
    if cfg.system_prompt is not None or any(r.conversational for r in rows):
        tokenizer.template()  # a ValueError now, at start, when the tokenizer has no template
    return RLData(train, held_out, cfg.guard(fns), correct)
