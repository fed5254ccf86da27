"""benchmarks/table1.py's aggregation on fake eval.json dicts (the eval stage's shape: model -> split -> metrics);
no training."""

from __future__ import annotations

import csv
import io

import pytest

from benchmarks.table1 import COLUMNS, csv_rows, main, markdown, mean_se, summarize, to_csv

META = {"timestamp": "2026-01-01T00:00:00Z", "git_sha": "abc123", "machine": "Test CPU", "threads": 1, "gpu": ""}


def fake_eval(acc_id: float, acc_ood: float, extra: bool = False) -> dict:
    def split(acc: float) -> dict:
        return {"eos_rate": 1.0, "length": 20.0, "accuracy": acc, "careful_rate": acc / 2, "loglik": -acc / 10}

    models = ["pretrain", "sft", "sft_extended"] + (["new_stage"] if extra else []) + ["srppo"]
    return {m: {"eval_id": split(acc_id), "eval_ood": split(acc_ood)} for m in models}


def draws(accs: list[float], extra: bool = False) -> list[dict]:
    return [{"draw": k, "seed": 1 + k, "world_seed": k, "wall_s": 100.0 + 10 * k, "eval": fake_eval(a, a / 2, extra)}
            for k, a in enumerate(accs)]


def test_mean_and_standard_error():
    s = summarize(draws([0.5, 0.7, 0.9]))
    acc = s["srppo"]["eval_id"]["accuracy"]
    assert acc.n == 3 and acc.mean == pytest.approx(0.7) and acc.se == pytest.approx(0.1154700538)
    ood = s["sft"]["eval_ood"]["accuracy"]  # 0.25, 0.35, 0.45
    assert ood.mean == pytest.approx(0.35) and ood.se == pytest.approx(0.0577350269)
    assert s["sft"]["eval_id"]["loglik"].mean == pytest.approx(-0.07)
    assert list(s) == ["pretrain", "sft", "sft_extended", "srppo"]  # eval.json's order
    assert mean_se([1.0, 3.0]).se == pytest.approx(1.0)  # std sqrt(2) (ddof=1) / sqrt(2)


def test_single_draw_has_no_standard_error():
    results = draws([0.6])
    s = summarize(results)
    assert s["sft"]["eval_id"]["accuracy"] == (pytest.approx(0.6), None, 1)
    md = markdown(results, s, META)
    assert "| SFT | 0.600 ± n/a | 0.300 ± n/a |" in md


def test_markdown_rows_and_new_stages():
    results = draws([0.5, 0.7, 0.9], extra=True)
    md = markdown(results, summarize(results), META)
    assert md.startswith("Table 1 over 3 draws on Test CPU (1 threads), git abc123, 2026-01-01T00:00:00Z")
    assert ("| model | in-domain accuracy | out-of-domain accuracy | in-domain careful share | out-of-domain careful "
            "share | in-domain loglik/token | out-of-domain loglik/token |") in md
    assert "| SRPPO | 0.700 ± 0.115 | 0.350 ± 0.058 | 0.350 ± 0.058 | 0.175 ± 0.029 | -0.0700 ± 0.0115 |" in md
    for label in ("PT", "SFT", "SFT (extended)", "new_stage"):  # a stage without a label keeps its name
        assert f"| {label} |" in md
    assert "| SFT (extended) | 0.500 / 0.250 | 0.700 / 0.350 | 0.900 / 0.450 |" in md
    assert "draw 2 (seed 3, world 2)" in md and "Wall-clock per draw: 100 s, 110 s, 120 s" in md


def test_csv_rows_per_draw_then_mean_and_se():
    results = draws([0.5, 0.7, 0.9])
    rows = list(csv.DictReader(io.StringIO(to_csv(csv_rows(results, summarize(results), META)))))
    assert list(rows[0]) == COLUMNS
    per_draw = [r for r in rows if r["draw"].isdigit()]
    assert len(per_draw) == 3 * 4 * 2 and per_draw[0]["model"] == "PT" and per_draw[0]["split"] == "eval_id"
    mean = next(r for r in rows if r["draw"] == "mean" and r["model"] == "SRPPO" and r["split"] == "eval_id")
    se = next(r for r in rows if r["draw"] == "se" and r["model"] == "SRPPO" and r["split"] == "eval_id")
    assert float(mean["accuracy"]) == pytest.approx(0.7) and float(se["accuracy"]) == pytest.approx(0.11547, abs=1e-6)
    assert float(mean["wall_s"]) == 110.0 and mean["seed"] == "" and mean["machine"] == "Test CPU"
    one = list(csv.DictReader(io.StringIO(to_csv(csv_rows(draws([0.6]), summarize(draws([0.6])), META)))))
    assert all(r["accuracy"] == "" for r in one if r["draw"] == "se")


def test_reserved_override_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "1", "seed=3"])
    assert "set per draw" in capsys.readouterr().err


def test_paired_differences_cancel_what_the_draws_share():
    """Every model of a draw moves with the draw's base: the paired difference removes that spread."""
    from benchmarks.table1 import paired

    results = draws([0.5, 0.7, 0.9])
    for k, r in enumerate(results):  # SRPPO 0.1, 0.2, 0.3 above SFT in domain
        r["eval"]["srppo"]["eval_id"] = dict(r["eval"]["sft"]["eval_id"], accuracy=r["eval"]["sft"]["eval_id"]
                                             ["accuracy"] + 0.1 * (k + 1))
    diff = paired(results, "srppo", "sft")
    assert diff["eval_id"].mean == pytest.approx(0.2) and diff["eval_id"].se == pytest.approx(0.0577350269)
    assert diff["eval_ood"].mean == pytest.approx(0.0) and diff["eval_ood"].se == pytest.approx(0.0)
    md = markdown(results, summarize(results), META)
    assert "SRPPO minus each other model, paired by draw" in md
    assert "| SFT | 0.200 ± 0.058 | 0.000 ± 0.000 |" in md
