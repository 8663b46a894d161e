"""Self-feedback revision: the four steps, what it returns, its counts, and a real run in the harness."""

from __future__ import annotations

from lmmkit.eval.backends.base import BackendError, GenerationSettings, Request
from lmmkit.eval.backends.revise import SelfRevisingBackend, chose_b, said_no


class ScriptedBackend:
    """A text-in, text-out backend with fixed replies per kind of prompt (it records every prompt)."""

    name = "scripted"

    def __init__(self, first: dict[str, str], feedback: dict[str, str], revised: dict[str, str],
                 choice: dict[str, str]) -> None:
        self.first, self.feedback, self.revised, self.choice = first, feedback, revised, choice
        self.prompts: list[str] = []

    def fingerprint(self) -> str:
        return "scripted-v1"

    def generate(self, requests, settings):
        out = []
        for r in requests:
            self.prompts.append(r.prompt)
            q = r.prompt.split("\n")[0]
            if "Which answer is more accurate" in r.prompt:
                out.append(self.choice[q])
            elif "Give a corrected answer" in r.prompt:
                out.append(self.revised[q])
            elif "Is the proposed answer correct" in r.prompt:
                out.append(self.feedback[q])
            else:
                reply = self.first[q]
                out.append(BackendError("boom") if reply == "ERROR" else reply)
        return out


def test_revises_only_where_the_model_doubts_and_keeps_its_choice():
    inner = ScriptedBackend(
        first={"q1": "Yes", "q2": "No", "q3": "Yes", "q4": "ERROR"},
        feedback={"q1": "No, it is wrong.", "q2": "Yes.", "q3": "no"},
        revised={"q1": "No", "q3": "No"},
        choice={"q1": "B", "q3": "Answer A"},
    )
    wrapped = SelfRevisingBackend(inner)
    out = wrapped.generate([Request(q) for q in ("q1", "q2", "q3", "q4")], GenerationSettings())
    assert out[:3] == ["No", "No", "Yes"]  # q1 switched to the revision; q3's model chose its first answer
    assert isinstance(out[3], BackendError)  # a failed first call stays failed, and is not asked about
    assert dict(wrapped.stats) == {"answers": 4, "doubted": 2, "switched": 1}
    assert sum("Proposed answer" in p for p in inner.prompts) == 3
    assert sum("corrected answer" in p for p in inner.prompts) == 2
    assert wrapped.fingerprint() != inner.fingerprint()


def test_parsers_are_conservative():
    assert said_no("No.") and said_no("no, there is none") and not said_no("Yes") and not said_no("unsure")
    assert chose_b("B") and chose_b("Answer B is better") and not chose_b("A") and not chose_b("Both")


def test_self_revision_runs_through_the_harness_on_a_real_model(shipped_checkpoint, tmp_path, capsys):
    from lmmkit.cli import main
    from lmmkit.data.shapes.bench import write_bench
    from lmmkit.data.shapes.generate import generate_shapes

    data = tmp_path / "shapes"
    generate_shapes(data, seed=0, n_train=4, n_test=8, n_pope_images=4, workers=1, progress=False)
    root = write_bench(data, n_images=4)["pope"].parent
    rc = main(["eval", "--model", str(shipped_checkpoint), "--tasks", "pope", "--data-root", str(root),
               "--limit", "6", "--self-revise", "--out", str(tmp_path / "out")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "self-revision: {'answers': 18" in out
    import json

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["self_revision"]["answers"] == 18
    assert "(self-revision)" in results["model"]
