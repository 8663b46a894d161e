"""Every eval task end to end on lmmkit's ShapesWorld twins (official formats): an lmmkit
checkpoint answers, a real localhost OpenAI-compatible server judges, the cache makes re-runs
free, and the CLI writes results.json, report.html and a comparison of runs."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from lmmkit.cli import main
from lmmkit.data.shapes.bench import write_bench
from lmmkit.data.shapes.generate import generate_shapes
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
from lmmkit.eval.backends.load import BlindBackend, load_backend
from lmmkit.eval.backends.openai_api import OpenAIBackend
from lmmkit.eval.cache import ResponseCache
from lmmkit.eval.judge import BackendJudge
from lmmkit.eval.runner import EvalOptions, run_eval
from lmmkit.eval.scoring.mme import score_mme_dir
from lmmkit.eval.tasks import TASKS, get_tasks
from openai_stub import StubServer


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("shapes")
    generate_shapes(data, seed=3, n_train=8, n_test=60, n_pope_images=6, workers=1)
    write_bench(data, n_images=16)
    return data / "bench"


@pytest.fixture(scope="session")
def checkpoint(shipped_checkpoint) -> Path:
    return shipped_checkpoint


def grading_judge(items_per_run: int):
    """A judge that grades every MM-Vet answer 0.4 in the first run and 0.6 after: runs differ."""
    grades = itertools.chain(["0.4"] * items_per_run, itertools.repeat("0.6"))

    def answer(model, prompt, images, temperature):
        assert not images
        if "rating:" in prompt.lower() or "rating: N" in prompt:
            return "The response names the objects.\nrating: 4"
        if "Extracted answer" in prompt:
            return "Extracted answer: 3"
        return next(grades)
    return answer


def test_every_task_runs_on_the_twins_and_reruns_from_cache(bench, checkpoint, tmp_path, one_torch_thread):
    backend = LmmkitBackend.from_checkpoint(checkpoint, progress=False)
    with StubServer(grading_judge(12)) as server:
        cache = ResponseCache(tmp_path / "cache.sqlite")
        judge = BackendJudge(OpenAIBackend(f"openai:{server.url}#judge"), cache)
        opts = EvalOptions(limit=12, judge_runs=2, progress=False, out_dir=tmp_path / "out")
        res = run_eval(get_tasks(list(TASKS)), backend, bench, cache, judge, opts)["tasks"]
        judged_calls = len(server.requests)
        assert set(res) == set(TASKS)
        for name, r in res.items():
            assert not r["failures"] and not r["load_errors"], name
        assert sum(r["strict"][s]["n"] for r in [res["pope"]] for s in ("random", "popular", "adversarial")) == 36
        assert set(res["mme"]["strict"]["tasks"]) == {"existence", "count", "position", "color"}
        assert res["mme"]["strict"]["missing"]["perception"]  # only 4 of the 10 official subtasks
        assert res["mmmu"]["strict"]["total"] == 12 and res["mathvista"]["strict"]["total"] == 12
        # Two judge runs, grading 0.4 then 0.6: totals 40 and 60 -> mean 50, population std 10.
        assert res["mmvet"]["strict"]["runs"] == [40.0, 60.0] and res["mmvet"]["strict"]["std"] == 10.0
        assert res["mmhal"]["strict"]["average"]["mean"] == 4.0 and res["mmhal"]["strict"]["hallucination_rate"]["mean"] == 0
        assert 0 < res["lmloss"]["strict"]["loss"] and res["lmloss"]["strict"]["tokens"] > 0
        answers = json.loads((tmp_path / "out" / "mmvet_results" / "results.json").read_text())
        assert sorted(answers) == sorted(it["id"] for it in res["mmvet"]["items"])
        template = json.loads((tmp_path / "out" / "mmhal_results" / "response_template.json").read_text())
        assert [t["model_answer"] for t in template] == [it["response"] for it in res["mmhal"]["items"]]
        # The MME result files in the official format score the same with the official rules.
        official = score_mme_dir(tmp_path / "out" / "mme_results")
        assert official["other_total"] == res["mme"]["strict"]["other_total"]
        assert {t: v["score"] for t, v in official["tasks"].items()} == \
            {t: v["score"] for t, v in res["mme"]["strict"]["tasks"].items()}
        # Re-run: every answer and every grade comes from the cache.
        again = run_eval(get_tasks(list(TASKS)), LmmkitBackend.from_checkpoint(checkpoint, progress=False), bench,
                         cache, judge, opts)["tasks"]
        assert all(r["model_calls"] == 0 for r in again.values())
        assert len(server.requests) == judged_calls
        assert again["mmvet"]["strict"] == res["mmvet"]["strict"] and again["mme"]["strict"] == res["mme"]["strict"]


def test_blind_control_changes_the_fingerprint_and_sees_blank_images(bench, tmp_path):
    seen = []

    def answer(model, prompt, images, temperature):
        from io import BytesIO

        from PIL import Image
        seen.append(Image.open(BytesIO(images[0])).getextrema())
        return "No"
    with StubServer(answer) as server:
        sighted = OpenAIBackend(f"openai:{server.url}#m")
        blind = BlindBackend(sighted)
        assert blind.fingerprint() != sighted.fingerprint()
        run_eval(get_tasks("pope"), blind, bench, ResponseCache(None), opts=EvalOptions(limit=2, progress=False))
    assert seen and all(ext == ((30, 30), (30, 30), (36, 36)) for ext in seen)


def test_mathvista_uses_the_judge_only_for_answers_rules_cannot_read(bench, tmp_path):
    def answer(model, prompt, images, temperature):
        if images:  # the model under test: numeric questions get a sentence, others a bare answer
            return "I think the answer is 3 because of the bars" if "integer" in prompt else "3"
        return "Extracted answer: 3"
    with StubServer(answer) as server:
        model = OpenAIBackend(f"openai:{server.url}#vlm")
        cache = ResponseCache(None)
        judge = BackendJudge(OpenAIBackend(f"openai:{server.url}#judge"), cache)
        with_judge = run_eval(get_tasks("mathvista"), model, bench, cache, judge,
                              EvalOptions(progress=False))["tasks"]["mathvista"]
        without = run_eval(get_tasks("mathvista"), model, bench, cache, None,
                           EvalOptions(progress=False))["tasks"]["mathvista"]
    asked = [r for r in server.requests if r["model"] == "judge"]
    # identical (question, reply) pairs share one cached extraction call
    assert with_judge["llm_extractions"] >= len(asked) > 0 and with_judge["unparseable"]["strict"] == 0
    assert without["unparseable"]["strict"] == with_judge["llm_extractions"]  # no judge: unread and wrong
    assert with_judge["strict"]["correct"] >= without["strict"]["correct"]
    # the robust parser reads "the answer is 3" without any LLM
    assert without["unparseable"]["robust"] < without["unparseable"]["strict"]


def test_cli_eval_and_report(bench, checkpoint, tmp_path, capsys, one_torch_thread):
    out1, out2 = tmp_path / "run1", tmp_path / "run2"
    args = ["eval", "--model", str(checkpoint), "--tasks", "pope,mme,mmmu", "--data-root", str(bench),
            "--limit", "8"]
    assert main([*args, "--out", str(out1)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"pope .*\n\s+metric\s+strict\s+95% CI\s+robust", text)
    assert re.search(r"F1 mean\s+[\d.]+\s+\[[\d.]+, [\d.]+\]", text)
    results = json.loads((out1 / "results.json").read_text())
    assert len(results["tasks"]["mmmu"]["items"]) == 8 and "response" in results["tasks"]["mmmu"]["items"][0]
    assert "<h2>mme</h2>" in (out1 / "report.html").read_text()
    assert main([*args, "--out", str(out2), "--blind"]) == 0
    assert re.search(r"metric\s+strict\s+95% CI\s+robust\s+blank img\s+no image", capsys.readouterr().out)
    blind_run = json.loads((out2 / "results.json").read_text())
    assert set(blind_run["blind_control"]) == set(blind_run["no_image_control"]) == {"pope", "mme", "mmmu"}
    assert "<th>no image (strict)</th>" in (out2 / "report.html").read_text()
    assert main(["compare", str(out1), str(out2), "--html", str(tmp_path / "diff.html")]) == 0
    # the same model twice: every difference is 0 and nothing is significant
    assert "yes" not in [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "<svg" in (tmp_path / "diff.html").read_text()
    assert main(["report", str(out1), str(out2), "--out", str(tmp_path / "cmp.html")]) == 0
    page = (tmp_path / "cmp.html").read_text()
    assert page.count("<svg") == 3 and "mmmu: accuracy (strict)" in page


def test_cli_eval_errors_name_the_problem(bench, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--tasks", "pope", "--data-root", str(bench)]) == 2
    assert "neither an lmmkit checkpoint nor an HF model folder" in capsys.readouterr().err
    assert main(["eval", "--model", "openai:http://127.0.0.1:9/v1#m", "--tasks", "pope,vqa",
                 "--data-root", str(bench)]) == 2
    assert "unknown task(s) vqa" in capsys.readouterr().err
    with pytest.raises(ValueError, match="openai:<base URL>#<model name>"):
        load_backend("openai:http://x/v1")


def test_hf_llava_folder_through_the_harness_with_a_local_judge(bench, tmp_path, tiny_tokenizer, tiny_llama_dir,
                                                                one_torch_thread):
    """An HF LlavaForConditionalGeneration folder answers; a local HF causal LM judges (no endpoint)."""
    from tiny_hf import save_tiny_llava

    model = load_backend(str(save_tiny_llava(tmp_path / "llava", tiny_tokenizer)))
    judge_backend = load_backend(str(tiny_llama_dir), text_only=True)
    assert model.name == "hf:llava" and judge_backend.name.startswith("hf-text:")
    cache = ResponseCache(None)
    res = run_eval(get_tasks("pope,mmvet"), model, bench, cache, BackendJudge(judge_backend, cache),
                   EvalOptions(limit=2, progress=False))["tasks"]
    assert res["pope"]["n_items"] == 6 and not res["pope"]["failures"]
    items = res["mmvet"]["items"]
    assert len(items) == 2 and all(len(it["grader_replies"][0]) >= 1 for it in items)
    # a random tiny judge cannot grade: each item took the official 5 tries and scored 0
    assert res["mmvet"]["unparseable"]["strict"] == 2 and res["mmvet"]["strict"]["total"] == 0.0


def test_eval_writes_official_formats_that_lmmkit_score_rescores_identically(bench, tmp_path):
    """What `lmmkit eval` writes in each benchmark's official format, rescored from the files alone by
    `lmmkit score` (the official rules), gives the eval's strict numbers."""
    from lmmkit.eval.rescore import (
        score_mathvista_output,
        score_mme_results,
        score_mmmu_outputs,
        score_pope_files,
    )

    def answer(model, prompt, images, temperature):
        if not images:
            return "Extracted answer: 3"
        if "option's letter" in prompt:
            return "B" if len(prompt) % 2 else "The answer is (C)."
        if "Hint:" in prompt:
            return "3" if "integer" in prompt else "I believe it is 2.5"
        return "Yes." if len(prompt) % 3 else "No, there is not."
    with StubServer(answer) as server:
        model = OpenAIBackend(f"openai:{server.url}#vlm")
        cache = ResponseCache(None)
        judge = BackendJudge(OpenAIBackend(f"openai:{server.url}#judge"), cache)
        out = tmp_path / "out"
        res = run_eval(get_tasks("pope,mme,mmmu,mathvista"), model, bench, cache, judge,
                       EvalOptions(progress=False, out_dir=out))["tasks"]
    for split in ("random", "popular", "adversarial"):
        again = score_pope_files(out / "pope_results" / f"pope_{split}_answers.json",
                                 bench / "pope" / f"coco_pope_{split}.json")
        assert again["strict"]["f1"] == res["pope"]["strict"][split]["f1"]
    mme = score_mme_results(out / "mme_results")
    assert mme["strict"]["perception_total"] == res["mme"]["strict"]["perception_total"]
    mmmu = score_mmmu_outputs(out / "mmmu_results", all_subjects=True)  # the twin's subjects are not official
    assert mmmu["strict"]["correct"] == res["mmmu"]["strict"]["correct"] > 0
    mathvista = score_mathvista_output(out / "mathvista_results" / "output.json")
    assert mathvista["strict"]["correct"] == res["mathvista"]["strict"]["correct"]


def test_a_judge_that_fails_stops_the_run_cleanly_and_keeps_the_answers(bench, tmp_path, capsys):
    def answer(model, prompt, images, temperature):
        return {"status": 400} if not images else "red"   # the judge (text-only) always fails
    with StubServer(answer) as server:
        argv = ["eval", "--model", f"openai:{server.url}#vlm", "--judge", f"openai:{server.url}#judge",
                "--tasks", "mmvet", "--data-root", str(bench), "--limit", "3", "--out", str(tmp_path / "o")]
        assert main(argv) == 1
        assert "HTTP 400" in capsys.readouterr().err
        asked = len(server.requests)
        server.answer = lambda model, prompt, images, temperature: "red" if images else "1.0"
        assert main(argv) == 0
        # the model's 3 answers came from the cache; only the judge was asked again
        assert all(r["model"] == "judge" for r in server.requests[asked:])
