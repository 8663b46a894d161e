"""ShapesWorld evaluation: POPE on held-out images (with a blind control) and the LM loss."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lmmkit.data.shapes.world import IMAGE_SIZE
from lmmkit.eval.generation import answer_questions
from lmmkit.eval.pope import SPLITS, read_pope_jsonl, score_answers
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache

POPE_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's POPE prompt


TWIN_TASKS: tuple[str, ...] = ("mme", "mmmu", "mathvista")


def evaluate_twins(model: VisionLanguageModel, data_dir: Path, tasks: tuple[str, ...] = TWIN_TASKS) -> dict:
    """The harness on lmmkit's ShapesWorld twins (written next to the data): {task: result}."""
    from lmmkit.data.shapes.bench import write_bench
    from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
    from lmmkit.eval.cache import ResponseCache
    from lmmkit.eval.runner import EvalOptions, run_eval
    from lmmkit.eval.tasks import get_tasks

    bench = write_bench(Path(data_dir))["pope"].parent
    backend = LmmkitBackend(model, fingerprint="in-memory model", name="demo model", progress=False)
    # A fresh in-memory cache: the model is being trained, so no answer may outlive this call.
    return run_eval(get_tasks(list(tasks)), backend, bench, ResponseCache(None),
                    opts=EvalOptions(progress=False))["tasks"]


def blank_image() -> Image.Image:
    """The blind control's image: an empty scene (background only)."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (30, 30, 36))


def evaluate_pope(model: VisionLanguageModel, data_dir: Path, blind: bool = False,
                  cache: FeatureCache | None = None, limit: int | None = None) -> dict:
    """{split: {"strict": metrics, "robust": metrics}} on out/test/pope_<split>.jsonl."""
    data_dir = Path(data_dir)
    cache = cache if cache is not None else FeatureCache()
    blank = blank_image()
    results = {}
    for split in SPLITS:
        rows = read_pope_jsonl(data_dir / "test" / f"pope_{split}.jsonl")[:limit]
        items = [(blank if blind else data_dir / "images" / r["image"], r["text"] + POPE_PROMPT_SUFFIX) for r in rows]
        answers = answer_questions(model, items, max_new_tokens=4, cache=cache,
                                   desc=f"pope {split}{' (blind)' if blind else ''}")
        results[split] = score_answers(answers, [r["label"] for r in rows])
    return results
