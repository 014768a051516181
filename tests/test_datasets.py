"""Prompt datasets: JSONL / JSON / Parquet / CSV files and folders, conversational prompts, column mapping,
deterministic per-step batches, and errors that name file, row and column."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.datasets import Row, TaskPrompts, columns_of, load_prompts, task_dataset
from nanoseek.tasks import examples, get_task

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
ROWS = [
    {"prompt": "1+1=", "answer": "2", "level": 1},
    {"prompt": CHAT, "answer": "4", "level": 2},
    {"prompt": "3+3=", "answer": "6", "level": 3},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_and_parquet_read_the_same(tmp_path):
    chats = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str)
              else r["prompt"]} for r in ROWS]  # a Parquet column has one type: all conversational
    write_jsonl(tmp_path / "d.jsonl", chats)
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(chats))
    for name in ("d.jsonl", "d.parquet", "d.json"):
        ds = load_prompts(tmp_path / name)
        assert [r.prompt for r in ds.rows] == [c["prompt"] for c in chats]
        assert [r.answer for r in ds.rows] == ["2", "4", "6"]
        assert ds.columns == {"answer", "level"}
        assert columns_of(list(ds.rows[::-1]), ds.columns) == {"answer": ["6", "4", "2"], "level": [3, 2, 1]}
        assert ds.rows[1].where == (f"{tmp_path / name}:2" if name == "d.jsonl" else f"{tmp_path / name} row 2")


def test_mixed_string_and_conversational_prompts(tmp_path):
    ds = load_prompts(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert [r.prompt for r in ds.rows] == ["1+1=", CHAT, "3+3="]
    assert [r.conversational for r in ds.rows] == [False, True, False]


def test_column_mapping_and_csv(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('question,final,id\n"What is 2+5?",7,a\n"' + json.dumps(CHAT).replace('"', '""') + '",4,b\n')
    ds = load_prompts(path, prompt_column="question", answer_column="final")
    assert [r.prompt for r in ds.rows] == ["What is 2+5?", CHAT]
    assert columns_of(list(ds.rows), ds.columns) == {"answer": ["7", "4"], "id": ["a", "b"]}


def test_sft_rows_prompt_completion_and_messages(tmp_path):
    rows = [{"prompt": "2+2=", "completion": "4"},
            {"prompt": CHAT, "completion": [{"role": "assistant", "content": "4"}]},
            {"messages": [*CHAT, {"role": "assistant", "content": "4"}]}]
    ds = load_prompts(write_jsonl(tmp_path / "sft.jsonl", rows), require_completion=True)
    assert [r.completion for r in ds.rows] == ["4", [{"role": "assistant", "content": "4"}]] * 1 + \
        [[{"role": "assistant", "content": "4"}]]
    assert ds.rows[2].prompt == CHAT
    with pytest.raises(ValueError, match=r"sft2.jsonl:1: no completion"):
        load_prompts(write_jsonl(tmp_path / "sft2.jsonl", [{"messages": CHAT}]), require_completion=True)


def test_folder_with_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), tmp_path / "test-00000-of-00001.parquet")
    assert len(load_prompts(tmp_path)) == 3
    assert [r.prompt for r in load_prompts(tmp_path, split="test").rows] == ["1+1="]
    with pytest.raises(ValueError, match="no files of split 'validation'; its files are named for test, train"):
        load_prompts(tmp_path, split="validation")
    with pytest.raises(ValueError, match="a single file has no 'test' split"):
        load_prompts(tmp_path / "train.jsonl", split="test")
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", ROWS[:2])
    write_jsonl(plain / "b.jsonl", ROWS[2:])
    assert len(load_prompts(plain)) == 3


@pytest.mark.parametrize("rows, match", [
    ([ROWS[0], {"prompt": None}], r":2 column 'prompt': missing value"),
    ([ROWS[0], {"question": "x"}], r":2: no column 'prompt' \(nor 'messages'\); the row has 'question'"),
    ([{"prompt": [{"role": "user", "content": 3}]}], r":1 column 'prompt': message 0 \(user\) needs 'content'"),
    ([{"prompt": [{"role": "bot", "content": "hi"}]}], r":1 column 'prompt': message 0 has role 'bot'"),
    ([{"prompt": 17}], r":1 column 'prompt': a int; give a string or a list"),
    ([{"prompt": "  "}], r":1 column 'prompt': empty"),
    ([{"prompt": "a", "completion": [{"role": "user", "content": "b"}]}], r"column 'completion': .*assistant"),
    ([ROWS[0], {"prompt": "x"}], None),  # the answer column is optional unless named
])
def test_bad_rows_name_file_row_and_column(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    if match is None:
        assert load_prompts(path).rows[1].answer is None
        with pytest.raises(ValueError, match=r"bad.jsonl:2: no answer column 'answer'"):
            load_prompts(path, answer_column="answer")
        return
    with pytest.raises(ValueError, match=match) as e:
        load_prompts(path)
    assert str(path) in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: malformed JSON"):
        load_prompts(tmp_path / "x.jsonl")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}]), tmp_path / "y.parquet")
    with pytest.raises(ValueError, match=r"y.parquet row 2 column 'prompt': missing value"):
        load_prompts(tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="no such file or folder"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_prompts(tmp_path / "e.jsonl")


def test_hub_names_go_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming=False):
        calls.append((name, config, split))
        return [{"question": "1+1?", "answer": "#### 2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_prompts("openai/gsm8k", config="main", split="test", prompt_column="question")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert ds.rows[0] == Row("1+1?", None, {"answer": "#### 2"}, "openai/gsm8k[test] row 1")


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    def offline(name, config, split, streaming=False):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="nobody/nothing.*not a local file or folder, and datasets.load_dataset "
                                         "failed: ConnectionError: Couldn't reach"):
        load_prompts("nobody/nothing")


def test_batches_are_deterministic_epochs(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)]
    ds = load_prompts(write_jsonl(tmp_path / "d.jsonl", rows))
    steps = [ds.batch(step, 4, seed=7) for step in range(5)]  # 20 rows = 2 epochs
    assert steps == [ds.batch(step, 4, seed=7) for step in range(5)]
    flat = [r.prompt for b in steps for r in b]
    assert sorted(flat[:10]) == sorted(flat[10:]) == sorted(r["prompt"] for r in rows)  # each row once per epoch
    assert flat[:10] != flat[10:]  # a fresh shuffle per epoch
    assert [r.prompt for r in ds.batch(0, 4, seed=8)] != flat[:4]
    assert len(ds.batch(0, 25, seed=0)) == 25  # more than one epoch in one batch
    assert [r.prompt for r in ds.batch(1, 4, seed=7, round_=1)] != [r.prompt for r in steps[1]]


def test_task_prompts_draw_like_the_trainer():
    task = get_task("arithmetic")
    source = TaskPrompts(task)
    rows = source.batch(3, 5, seed=2, round_=1)
    exs = examples(task, 5, "train", seed=(2 * 1_000_003 + 3) * 101 + 1)  # GRPOTrainer.prompts(step=3, round_=1)
    assert [(r.prompt, r.answer, r.completion) for r in rows] == [(e.prompt, e.answer, e.completion) for e in exs]
    assert columns_of(rows, source.columns) == {"answer": [e.answer for e in exs], "example": exs}
    assert [r.prompt for r in TaskPrompts(task, "eval").batch(0, 50)] == \
        [e.prompt for e in examples(task, 50, "eval", seed=0)]


def test_held_out_split_is_disjoint_and_stable(tmp_path):
    rows = [{"prompt": f"question {i}"} for i in range(200)] * 2  # each prompt twice
    train, held = load_prompts(write_jsonl(tmp_path / "d.jsonl", rows)).split(10)
    assert len(train) + len(held) == 400 and 10 <= len(held) <= 70
    assert not {r.prompt for r in train.rows} & {r.prompt for r in held.rows}


def test_task_dataset():
    ds = task_dataset(get_task("arithmetic", max_operand=9), 20, "eval", seed=0)
    assert len({r.prompt for r in ds.rows}) == len(ds) == 20
    for r in ds.rows:
        a, b = r.prompt.rstrip("=").replace("-", " -").replace("+", " +").split()
        assert r.answer == str(int(a) + int(b)) == r.completion == r.columns["example"].answer
