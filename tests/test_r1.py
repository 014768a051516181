"""``nanoseek r1 --quick``: every stage of the R1 pipeline runs and the table reports each one (slow: 4-8 min)."""

import json
import subprocess
import sys

import pytest

from nanoseek.recipes.r1 import ROWS, R1Config, build_report, summary_table


@pytest.mark.slow
def test_quick_pipeline_reports_every_stage(tmp_path):
    out = tmp_path / "r1"
    cmd = [sys.executable, "-m", "nanoseek.cli", "r1", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["stage"] for r in report["rows"]] == [name for name, _, _ in ROWS]
    md = (out / "report.md").read_text()
    for row in report["rows"]:
        assert row["label"] in md and row["label"] in done.stdout
        assert row["skipped"] is None, row  # the quick run keeps samples: every stage trains and is evaluated
        ev = row["eval"]
        assert ev["n"] == report["heldout_problems"] and 0 <= ev["accuracy"] <= 1 and 0 <= ev["pass@2"] <= 1
        assert f"{100 * ev['accuracy']:.1f}%" in md
    kept = json.loads((out / "stages.json").read_text())["rejection_sampling"]
    rows = [json.loads(line) for line in (out / "3_rejection_sampling.jsonl").read_text().splitlines()]
    assert len(rows) == kept["kept"] > 0 and all(min(r["rewards"].values()) >= 1.0 and not r["truncated"]
                                                   for r in rows)
    student = report["rows"][-1]["eval"]
    teacher = report["rows"][0]["eval"]
    assert student["attention"] == "mha" and not student["moe"] and student["params"] < teacher["params"]
    assert student["accuracy"] > 0  # 50 steps from scratch left it at 0% (loss 1.7: not yet the format)


def test_table_shows_skipped_stages_and_times():
    cfg = R1Config(eval_num_generations=2)
    ev = {"n": 10, "accuracy": 0.1, "sample_accuracy": 0.05, "pass@2": 0.2, "maj@2": 0.1, "params": 2000,
          "active_params": 1000, "attention": "mla", "moe": True}
    done = {"cold_sft": {"wall_time_s": 12.0}, "eval_cold_sft": ev, "grpo": {"wall_time_s": 5.0}, "eval_grpo": ev,
            "rejection_sampling": {"wall_time_s": 3.0, "kept": 0, "samples": 64},
            "rft": {"skipped": "rejection sampling kept no sample", "wall_time_s": 0.0},
            "distill_sampling": {"wall_time_s": 2.0, "kept": 5, "samples": 64}, "student": {"wall_time_s": 7.0},
            "eval_student": {**ev, "attention": "mha", "moe": False, "params": 1500, "active_params": 1500}}
    table = summary_table(build_report(cfg, done, 40.0))
    lines = table.splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert lines[2] == ("| 1. cold-start SFT | MLA + MoE, 2k params (1k active) | 10.0% | 5.0% | 20.0% | 10.0% |  "
                        "| 12 s |")
    assert "(skipped: rejection sampling kept no sample) | — | — | — | — | — | 0 / 64 | 3 s |" in lines[4]
    assert lines[5].endswith("| MHA, 2k params (2k active) | 10.0% | 5.0% | 20.0% | 10.0% | 5 / 64 | 9 s |")
