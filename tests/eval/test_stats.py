"""Bootstrap intervals, clustered resampling, McNemar, the paired bootstrap and `lmmkit compare`."""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pytest

from lmmkit.eval.compare_cli import add_compare_parser
from lmmkit.eval.pope import SPLITS, score_pope
from lmmkit.eval.scoring.mme import score_mme
from lmmkit.eval.scoring.mmvet import aggregate_mmvet
from lmmkit.eval.stats import Resample, binomial_tail, bootstrap_ci, mcnemar, paired_bootstrap
from lmmkit.eval.task_stats import (
    accuracy_statistic,
    compare_runs,
    mme_score,
    pope_f1,
    pope_statistic,
    task_intervals,
)

# --------------------------------------------------------------------------------------------
# Synthetic results, shaped as the task modules write them
# --------------------------------------------------------------------------------------------


def _flip(label: str) -> str:
    return "no" if label == "yes" else "yes"


def pope_result(n_images: int, acc: float, seed: int, per_image: bool = False) -> dict:
    """3 splits x n_images x 6 questions; `per_image`: an image's answers are all right or all wrong."""
    rng = random.Random(seed)
    image_ok = [rng.random() < acc for _ in range(n_images)]
    items = []
    for split in SPLITS:
        for i in range(n_images):
            for k in range(6):
                label = "yes" if k % 2 == 0 else "no"
                ok = image_ok[i] if per_image else rng.random() < acc
                pred = None if rng.random() < 0.01 else (label if ok else _flip(label))
                items.append({"id": f"{split}/{i * 6 + k + 1}", "cluster": f"img{i}.jpg",
                              "response": str(pred), "answer": label, "strict": pred, "robust": pred,
                              "correct_strict": pred == label, "correct_robust": pred == label})
    return {"strict": {}, "robust": {}, "n_items": len(items), "items": items}


MME_SUBTASKS = ("existence", "count", "commonsense_reasoning", "shapes_existence")


def mme_result(n_images: int, acc: float, seed: int) -> dict:
    rng = random.Random(seed)
    items = []
    for sub in MME_SUBTASKS:
        for i in range(n_images):
            for k, answer in enumerate(("Yes", "No")):
                gold = answer.lower()
                parsed = "other" if rng.random() < 0.02 else (gold if rng.random() < acc else _flip(gold))
                items.append({"id": f"{sub}/{2 * i + k + 1}", "cluster": f"{sub}/{i}.png", "answer": answer,
                              "strict": parsed, "robust": parsed,
                              "correct_strict": parsed == gold, "correct_robust": parsed == gold})
    return {"strict": {}, "robust": {}, "n_items": len(items), "items": items}


def mmvet_result(n: int, mean: float, seed: int, runs: int = 2) -> dict:
    rng = random.Random(seed)

    def grade() -> float:
        return min(1.0, max(0.0, round(rng.gauss(mean, 0.3), 1)))
    items = [{"id": f"v{i}", "scores": [grade() for _ in range(runs)]} for i in range(n)]
    return {"strict": {}, "robust": None, "n_items": n, "items": items}


def mmhal_result(n: int, mean: float, seed: int) -> dict:
    rng = random.Random(seed)
    items = [{"id": str(i), "ratings": [min(6, max(0, round(rng.gauss(mean, 1.5))))]} for i in range(n)]
    return {"strict": {}, "robust": None, "n_items": n, "items": items}


def acc_records(n: int, acc: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": str(i), "correct_strict": rng.random() < acc, "correct_robust": rng.random() < acc}
            for i in range(n)]


def run(model: str, **tasks: dict) -> dict:
    return {"model": model, "fingerprint": model, "data_root": "/data", "judge": None, "tasks": tasks}


def width(ci: dict) -> float:
    return ci["high"] - ci["low"]


# --------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------


def test_interval_contains_estimate_and_shrinks_with_more_items():
    small = bootstrap_ci(acc_records(100, 0.7, 1), accuracy_statistic())
    large = bootstrap_ci(acc_records(3000, 0.7, 1), accuracy_statistic())
    for ci in (small, large):
        assert ci["low"] <= ci["estimate"] <= ci["high"]
        assert ci["n_boot"] == 2000 and ci["clustered"] is False
    assert width(large) < width(small) / 3  # ~ sqrt(30) narrower


def test_clustered_interval_is_wider_when_answers_about_an_image_agree():
    items = pope_result(150, 0.8, 2, per_image=True)["items"]
    clusters = [r["cluster"] for r in items]
    stat = accuracy_statistic()
    by_item = bootstrap_ci(items, stat)
    by_image = bootstrap_ci(items, stat, clusters)
    assert by_image["clustered"] and by_image["estimate"] == by_item["estimate"]
    # 18 perfectly correlated answers per image: the honest interval is several times wider
    assert width(by_image) > 2.5 * width(by_item)


def test_vectorised_and_plain_statistics_agree():
    items = mme_result(20, 0.8, 3)["items"]
    clusters = [r["cluster"] for r in items]
    fast = bootstrap_ci(items, accuracy_statistic(), clusters, n_boot=300, seed=5)
    slow = bootstrap_ci(items, lambda rs: accuracy_statistic()(rs), clusters, n_boot=300, seed=5)
    assert fast == pytest.approx(slow, abs=1e-12)
    # F1 on the full sample through the vectorised path equals score_pope's own number
    pope = pope_result(40, 0.8, 4)["items"]
    ones = Resample(np.ones((1, len(pope))), np.arange(len(pope)))
    for split in SPLITS:
        expected = score_pope([r["strict"] for r in pope if r["id"].startswith(split)],
                              [r["answer"] for r in pope if r["id"].startswith(split)])["f1"]
        assert pope_statistic("strict", split).vectorised(pope)(ones)[0] == pytest.approx(expected, abs=1e-15)


def test_seed_makes_intervals_reproducible():
    items = pope_result(30, 0.8, 5)["items"]
    clusters = [r["cluster"] for r in items]
    stat = pope_statistic()
    first = bootstrap_ci(items, stat, clusters, seed=11)
    assert bootstrap_ci(items, stat, clusters, seed=11) == first
    assert bootstrap_ci(items, stat, clusters, seed=12) != first
    again = task_intervals("pope", {"items": items}, seed=3)
    assert task_intervals("pope", {"items": items}, seed=3) == again


def test_a_cluster_must_stay_inside_its_stratum():
    with pytest.raises(ValueError, match="strata"):
        bootstrap_ci(acc_records(4, 0.5, 0), accuracy_statistic(), ["a", "a", "b", "b"],
                     strata=["x", "y", "y", "y"])


# --------------------------------------------------------------------------------------------
# Task intervals: the estimates are the tasks' own numbers
# --------------------------------------------------------------------------------------------


def test_pope_intervals_per_split_and_mean():
    items = pope_result(50, 0.85, 6)["items"]
    out = task_intervals("pope", {"items": items}, n_boot=500)
    assert set(out) == {"strict", "robust"}
    assert list(out["strict"]) == ["F1 mean", "F1 random", "F1 popular", "F1 adversarial"]
    f1s = [pope_f1([r for r in items if r["id"].startswith(s)]) for s in SPLITS]
    assert out["strict"]["F1 mean"]["estimate"] == pytest.approx(sum(f1s) / 3, abs=1e-15)
    for ci in out["strict"].values():
        assert ci["clustered"] and ci["low"] <= ci["estimate"] <= ci["high"]


def test_mme_intervals_match_the_official_scores():
    items = mme_result(25, 0.8, 7)["items"]
    out = task_intervals("mme", {"items": items}, n_boot=500)["strict"]
    rows = {}
    for r in items:
        sub, image = r["cluster"].split("/")
        rows.setdefault(sub, []).append((image, r["answer"], r["strict"]))
    official = score_mme(rows)
    assert list(out)[:3] == ["perception score", "cognition score", "other score"]
    for group in ("perception", "cognition", "other"):
        assert out[f"{group} score"]["estimate"] == pytest.approx(official[f"{group}_total"], abs=1e-9)
    for sub in MME_SUBTASKS:
        assert out[f"{sub} score"]["estimate"] == pytest.approx(official["tasks"][sub]["score"], abs=1e-12)
        own = [r for r in items if r["id"].startswith(sub + "/")]
        assert mme_score(own) == official["tasks"][sub]["score"]
        assert out[f"{sub} score"]["low"] <= out[f"{sub} score"]["estimate"] <= out[f"{sub} score"]["high"]


def test_judged_and_accuracy_task_intervals():
    vet = mmvet_result(80, 0.5, 8)
    runs = [{r["id"]: r["scores"][k] for r in vet["items"]} for k in range(2)]
    total = task_intervals("mmvet", vet, n_boot=300)
    assert set(total) == {"strict"}
    expected = float(np.mean(aggregate_mmvet(runs)["run_totals"]))
    assert total["strict"]["total (0-100)"]["estimate"] == pytest.approx(expected, abs=1e-9)
    hal = task_intervals("mmhal", mmhal_result(60, 3.0, 9), n_boot=300)["strict"]["average rating (0-6)"]
    assert 0 <= hal["low"] <= hal["estimate"] <= hal["high"] <= 6
    acc = task_intervals("mmmu", {"items": acc_records(200, 0.4, 10)}, n_boot=300)
    assert set(acc) == {"strict", "robust"} and not acc["strict"]["accuracy"]["clustered"]
    assert task_intervals("lmloss", {"strict": {"loss": 1.0}, "robust": None}) == {}


# --------------------------------------------------------------------------------------------
# Paired tests
# --------------------------------------------------------------------------------------------


def test_mcnemar_exact_p_value():
    # 10 items only B gets right, 2 only A, plus concordant ones (which do not matter)
    a = [False] * 10 + [True] * 2 + [True] * 30 + [False] * 8
    b = [True] * 10 + [False] * 2 + [True] * 30 + [False] * 8
    out = mcnemar(a, b)
    expected = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12
    assert out == {"b_only": 10, "a_only": 2, "p_value": pytest.approx(expected, rel=1e-15)}
    assert mcnemar(b, a)["p_value"] == out["p_value"]
    assert mcnemar(a, a)["p_value"] == 1.0
    assert mcnemar([True, False], [False, True])["p_value"] == 1.0  # one each way: capped at 1


def test_binomial_tail_in_log_space_matches_exact_integers():
    for k, n in ((480, 1200), (1400, 3000), (10, 5000)):
        exact = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        assert binomial_tail(k, n) == pytest.approx(exact, rel=1e-9)


def test_identical_runs_differ_by_nothing():
    res = run("m", pope=pope_result(20, 0.8, 11), mme=mme_result(10, 0.8, 12),
              mmvet=mmvet_result(40, 0.5, 13), mmhal=mmhal_result(40, 3.0, 14),
              mmmu={"items": acc_records(60, 0.5, 15)}, lmloss={"strict": {"loss": 2.0}, "robust": None})
    out = compare_runs(res, res, n_boot=300)
    assert set(out["tasks"]) == {"pope", "mme", "mmvet", "mmhal", "mmmu"}
    assert out["skipped"] == {"lmloss": "no per-item records in common"}
    for task in out["tasks"].values():
        assert task["only_a"] == task["only_b"] == 0
        for row in task["rows"]:
            assert row["difference"] == 0 and row["low"] == row["high"] == 0
            assert row["p_value"] == 1.0 and row["bootstrap_p"] == 1.0 and not row["significant"]
    items = res["tasks"]["mmvet"]["items"]
    same = paired_bootstrap(items, items, lambda rs: float(np.mean([r["scores"][0] for r in rs])), n_boot=200)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_a_clearly_better_run_is_significant():
    a = run("a", pope=pope_result(60, 0.70, 16), mmvet=mmvet_result(150, 0.35, 17))
    b = run("b", pope=pope_result(60, 0.90, 18), mmvet=mmvet_result(150, 0.65, 17))
    out = compare_runs(a, b, n_boot=500)
    pope = out["tasks"]["pope"]["rows"][0]
    assert (pope["parser"], pope["metric"], pope["test"]) == ("strict", "F1 mean", "McNemar")
    assert pope["difference"] > 0.1 and pope["low"] > 0 and pope["significant"]
    assert pope["mcnemar"]["b_only"] > pope["mcnemar"]["a_only"] and pope["p_value"] < 1e-6
    vet = out["tasks"]["mmvet"]["rows"][0]
    assert vet["test"] == "paired bootstrap" and vet["significant"] and vet["low"] > 10
    assert vet["a_low"] <= vet["a"] <= vet["a_high"] and vet["b_low"] <= vet["b"] <= vet["b_high"]
    worse = compare_runs(b, a, n_boot=500)["tasks"]["pope"]["rows"][0]
    assert worse["difference"] == -pope["difference"] and worse["high"] < 0 and worse["significant"]


def test_compare_pairs_items_by_id():
    a = run("a", mme=mme_result(15, 0.7, 19))
    b_items = mme_result(15, 0.8, 20)["items"]
    shuffled = list(b_items)
    random.Random(0).shuffle(shuffled)
    ordered = compare_runs(a, run("b", mme={"items": b_items}), n_boot=300)
    mixed = compare_runs(a, run("b", mme={"items": shuffled}), n_boot=300)
    assert mixed["tasks"] == ordered["tasks"]
    assert mixed["tasks"]["mme"]["n_paired"] == len(b_items)
    # one image pair missing from B and an extra item only in B: counted, the rest still paired
    partial = [r for r in shuffled if r["cluster"] != "count/3.png"] + [{**b_items[0], "id": "extra/1"}]
    out = compare_runs(a, run("b", mme={"items": partial}), n_boot=300)["tasks"]["mme"]
    assert (out["n_paired"], out["only_a"], out["only_b"]) == (len(b_items) - 2, 2, 1)


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmmkit")
    add_compare_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_prints_the_table_and_writes_json_and_html(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(run("model-a", pope=pope_result(30, 0.7, 21),
                                                                 mmhal=mmhal_result(50, 2.5, 22))))
    (tmp_path / "b.json").write_text(json.dumps(run("model-<b>", pope=pope_result(30, 0.9, 23),
                                                    mmhal=mmhal_result(50, 3.5, 24))))
    args = _parser().parse_args(["compare", str(tmp_path / "a"), str(tmp_path / "b.json"), "--n-boot", "300",
                                 "--json", str(tmp_path / "out" / "cmp.json"),
                                 "--html", str(tmp_path / "out" / "cmp.html")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for word in ("metric", "B-A", "95% CI", "significant", "pope:", "F1 mean (strict)", "McNemar", "mmhal:",
                 "average rating (0-6) (strict)", "paired bootstrap", "model-a", "clustered by image"):
        assert word in text
    data = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert data["tasks"]["pope"]["rows"][0]["significant"] is True and data["n_boot"] == 300
    page = (tmp_path / "out" / "cmp.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<circle" in page
    assert "model-&lt;b&gt;" in page and "model-<b>" not in page


def test_cli_reports_a_missing_run(tmp_path, capsys):
    args = _parser().parse_args(["compare", str(tmp_path / "nope"), str(tmp_path / "nope2")])
    assert args.func(args) == 2
    assert "no results.json" in capsys.readouterr().err
