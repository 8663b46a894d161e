"""ShapesWorld evaluation for the demo, through the harness: POPE on held-out images with blind
controls, the MME / MMMU / MathVista twins, and the significance of each training stage."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from lmmkit.data.shapes.world import IMAGE_SIZE
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
from lmmkit.eval.backends.load import BlindBackend
from lmmkit.eval.cache import ResponseCache
from lmmkit.eval.runner import EvalOptions, run_eval
from lmmkit.eval.tasks import get_tasks
from lmmkit.models.vlm import VisionLanguageModel
from lmmkit.train.features import FeatureCache

TWIN_TASKS: tuple[str, ...] = ("mme", "mmmu", "mathvista")
CONTROLS = {"blind control (blank image)": "blank", "no image": "none"}


def blank_image() -> Image.Image:
    """An empty scene (background only): what the blank-image control shows."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (30, 30, 36))


def evaluate_stage(model: VisionLanguageModel, bench: Path, stage: str, tasks: tuple[str, ...] = ("pope",),
                   features: FeatureCache | None = None, controls: bool = False) -> dict:
    """{"model": {task: result}, control name: {task: result}...} for a model in training.

    Every call gets a fresh in-memory response cache: the weights change between stages, so no
    answer may outlive the call. The tower is frozen, so its features may (`features`)."""
    backend = LmmkitBackend(model, fingerprint=f"in-training:{stage}", name=stage, progress=False, features=features)
    opts = EvalOptions(progress=False)
    out = {"model": run_eval(get_tasks(list(tasks)), backend, bench, ResponseCache(None), opts=opts)["tasks"]}
    if controls:
        for name, mode in CONTROLS.items():
            out[name] = run_eval(get_tasks("pope"), BlindBackend(backend, mode), bench, ResponseCache(None),
                                 opts=opts)["tasks"]
    return out


def pope_by_split(result: Mapping) -> dict:
    """A harness POPE result as the report's {split: {"strict": metrics, "robust": metrics}}."""
    return {split: {"strict": result["strict"][split], "robust": result["robust"][split]}
            for split in result["strict"] if split != "mean_f1"}
