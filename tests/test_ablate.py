"""``nanoseek ablate``: the variants' FLOP and parameter matching, the cache of runs, MaxVio, the speculative
acceptance counter, and the report of a quick run (one study here; every study under -m slow)."""

import json
import math

import pytest
import torch
from test_speculative import agreeing_model

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.flops import flops_per_token
from nanoseek.model.transformer import Transformer
from nanoseek.recipes import ablate, runner


def sizes(overrides: dict, seq_len: int) -> tuple[float, int, int]:
    """FLOPs/token, parameters, active parameters of the main model."""
    config = ModelConfig.preset("tiny", **overrides)
    model = Transformer(config)
    return flops_per_token(config, seq_len), model.num_parameters(), model.num_active_parameters()


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 0.03 * b


@pytest.mark.parametrize("scale", [ablate.QUICK, ablate.FULL], ids=["quick", "full"])
def test_variants_match_flops_and_parameters_within_3_percent(scale):
    n = scale["seq_len"]
    moe = {v: sizes(o, n) for v, o in ablate.variants("moe", scale, scale["vocab"]).items()}
    fine, coarse = moe["deepseekmoe"], moe["gshard"]
    assert all(close(x, y) for x, y in zip(coarse, fine))  # same FLOPs, total and active parameters
    assert close(moe["dense-active"][0], fine[0]) and close(moe["dense-total"][1], fine[1])
    assert moe["dense-active"][1] < 0.7 * fine[1] and moe["dense-total"][0] > 1.4 * fine[0]  # not equal by accident
    heads = ablate.variants("attention", scale, scale["vocab"])
    attention = {v: sizes(o, n) for v, o in heads.items()}
    assert all(close(attention[v][1], attention["mla"][1]) for v in ("mha", "gqa"))
    assert [heads[v]["num_key_value_heads"] for v in ("mha", "gqa")] == [4, 2]
    mtp = [sizes(o, n) for o in ablate.variants("mtp", scale, scale["vocab"]).values()]
    assert len({m[1:] for m in mtp}) == 1 and mtp[0][0] < mtp[1][0] < mtp[2][0]  # one main model; MTP costs FLOPs
    balance = ablate.variants("balance", scale, scale["vocab"])
    assert balance["aux-free"] == balance["aux-loss"] == ablate.variants("moe", scale, scale["vocab"])["deepseekmoe"]


def test_maxvio_is_max_load_over_mean_minus_one():
    """V3 §4.5.2 by hand: loads (6, 2, 2, 2) -> max 6 / mean 3 - 1 = 1; (3, 3, 3, 3) -> 0; as pretrain logs them."""
    loads = [torch.tensor([[6.0, 2, 2, 2], [3, 3, 3, 3]]), torch.tensor([[1.0, 1, 1, 5], [2, 4, 1, 1]])]
    records = [{"step": i + 1, "expert_load_max_mean": [(ld.max() / ld.mean()).item() for ld in step]}
               for i, step in enumerate(loads)]
    assert ablate.maxvio(records) == [[1.0, 1.5], [0.0, 1.0]]
    assert ablate.maxvio([{"step": 1, "loss": 1.0}]) == []  # a dense model logs no loads


@pytest.mark.parametrize("depth", [1, 2])
def test_acceptance_is_one_when_the_mtp_heads_are_exact(depth):
    """Every draft of a model whose MTP modules predict what the main model will (test_speculative's) is accepted."""
    result = ablate.decode(agreeing_model(depth), [[3, 4, 5], [5], [1, 2]], 12, speculative=True)
    assert [result[f"accept@{d}"] for d in range(1, depth + 1)] == [1.0] * depth
    assert result["decode_tok_s"] > 0
    assert set(ablate.decode(agreeing_model(depth), [[3, 4]], 5, speculative=False)) == {"decode_tok_s"}


def test_finished_runs_are_not_retrained_and_more_seeds_reuse_them(tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(study, variant, out, corpus, overrides, *, s, seed, device):
        calls.append((variant, seed))
        bpb = (1.0 if variant == "aux-free" else 3.0) + 0.1 * seed
        return {"figures": {"val_bpb": bpb, "maxvio": bpb}, "curves": {"val bpb vs step": ([1, 2], [bpb + 1, bpb])}}

    monkeypatch.setattr(ablate, "prepare", lambda cfg: calls.append("prepare") or {})
    monkeypatch.setattr(ablate, "read_index", lambda corpus: {"vocab_size": 300})
    monkeypatch.setattr(ablate, "pretrain", fake_pretrain)
    out = tmp_path / "ablate"
    assert main(["ablate", "--quick", "--study", "balance", "--out", str(out)]) == 0
    sweep = [("dense-active", 0)] * len(ablate.LR_SWEEP)  # the learning-rate sweep, once
    assert calls == ["prepare", *sweep, ("aux-free", 0), ("aux-loss", 0)]
    assert main(["ablate", "--quick", "--study", "balance", "--out", str(out), "--resume", "--seeds", "2"]) == 0
    assert calls[6:] == [("aux-free", 1), ("aux-loss", 1)]  # seed 0, the sweep and the corpus: OUT/stages.json
    assert set(json.loads((out / "stages.json").read_text())) == {"corpus", *(f"lr/{lr:g}" for lr in ablate.LR_SWEEP),
                                                                  *(f"{v}/{s}" for v in ("base", "balance/aux-loss")
                                                                    for s in (0, 1))}
    report = json.loads((out / "report.json").read_text())
    assert report["figures"]["balance"]["aux-loss"]["val_bpb"] == pytest.approx([3.05, 12.706 * 0.05])
    assert [c["verdict"] for c in report["claims"]] == ["holds", "holds"]  # CIs ±0.64 apart by 2


def test_mean_ci_and_verdicts():
    mean, ci = runner.mean_ci([1.0, 2.0, 3.0], student=True)
    assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert runner.mean_ci([1.0, 2.0, 3.0])[1] == pytest.approx(1.96 / math.sqrt(3))
    assert runner.mean_ci([5.0]) == (5.0, None)
    results = {"attention": {v: [{"figures": {"val_bpb": x}} for x in xs] for v, xs in (
        ("mla", [1.0, 1.1]), ("mha", [3.0, 3.1]), ("gqa", [-1.0, -0.9]))}}
    report, text = ablate.build_report(results, ablate.QUICK, [0, 1])
    assert [c["verdict"] for c in report["claims"]] == ["holds", "does not hold"]
    results["attention"]["gqa"] = [{"figures": {"val_bpb": x}} for x in (0.5, 1.5)]
    assert ablate.build_report(results, ablate.QUICK, [0, 1])[0]["claims"][1]["verdict"] == \
        "within noise at this scale"
    assert "| mla | 1.05 ± 0.64 |" in text and "**does not hold**" in text


def check_report(out, studies: list[str]) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert list(report["figures"]) == studies and report["seeds"] == [0]
    for by_variant in report["figures"].values():
        for figures in by_variant.values():
            assert all(math.isfinite(mean) and ci is None for mean, ci in figures.values())
    md = (out / "report.md").read_text()
    assert "## verdicts" in md and all(f"## {s}" in md for s in studies) and "One learning rate" in md
    assert all(c["verdict"] == "within noise at this scale" for c in report["claims"])  # one seed: no CI
    for plot in report["plots"]:
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    return report


def test_quick_mtp_study_reports_finite_numbers_and_resumes(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert main(["ablate", "--quick", "--study", "mtp", "--out", str(out)]) == 0
    report = check_report(out, ["mtp"])
    figures = report["figures"]["mtp"]
    assert "accept@1" not in figures["D=0"] and 0 <= figures["D=2"]["accept@2"][0] <= 1
    assert figures["D=0"]["val_bpb"][0] < 8  # bits per byte of a model that learned a little
    assert main(["ablate", "--quick", "--study", "mtp", "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.count("done earlier") == 7  # the corpus, the three of the sweep, the three runs


@pytest.mark.slow
def test_quick_run_of_every_study(tmp_path):
    out = tmp_path / "ablate"
    assert main(["ablate", "--quick", "--out", str(out)]) == 0
    report = check_report(out, list(ablate.STUDIES))
    assert len(report["claims"]) == len(ablate.CLAIMS) and report["plots"] == [
        f"plots/{s}.png" for s in ablate.STUDIES if s != "rl"]
