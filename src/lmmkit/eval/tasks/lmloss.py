"""The multimodal LM loss: answer-token cross-entropy and perplexity on held-out conversations.

Files: `lmloss/conversations.json` (LLaVA JSON) with images under `lmloss/images/`. It needs the
model's logits, so it runs on lmmkit checkpoints only (an endpoint returns text, not logits).
"""

from __future__ import annotations

import time
from pathlib import Path

from lmmkit.eval.backends.base import Backend, GenerationSettings
from lmmkit.eval.tasks.base import TaskDataError, task_folder


class LMLossTask:
    name = "lmloss"
    settings = GenerationSettings()
    needs_judge = False
    direct = True  # the runner calls evaluate() instead of asking questions

    def evaluate(self, backend: Backend, root: Path, limit: int | None = None) -> dict:
        from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
        from lmmkit.eval.generation import lm_loss
        from lmmkit.train.run import load_samples

        if not isinstance(backend, LmmkitBackend):
            raise TaskDataError(f"lmloss needs the model's logits: it runs on lmmkit checkpoints, not {backend.name}")
        start = time.time()
        folder = task_folder(root, "lmloss")
        path = folder / "conversations.json"
        if not path.is_file():
            raise TaskDataError(f"{folder}: no conversations.json (LLaVA JSON)")
        samples, counter = load_samples(backend.model, path, folder / "images", 512)
        samples = samples[:limit] if limit else samples
        result = lm_loss(backend.model, samples, cache=backend.features)
        return {"strict": result, "robust": None, "unparseable": {"strict": 0, "robust": None},
                "task": self.name, "source": str(folder), "n_items": len(samples), "model_calls": 0,
                "from_cache": 0, "load_errors": [counter.summary()] if counter.total else [], "failures": [],
                "seconds": round(time.time() - start, 2), "items": []}
