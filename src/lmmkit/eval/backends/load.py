"""Turn a --model / --judge argument into a backend, and the blind-control wrapper."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from lmmkit.eval.backends.base import Backend, BackendError, GenerationSettings, Request


def _is_lmmkit_checkpoint(path: Path) -> bool:
    from lmmkit.train.checkpoint import resolve_checkpoint

    try:
        resolve_checkpoint(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def load_backend(spec: str, text_only: bool = False, api_key_env: str = "OPENAI_API_KEY",
                 batch_size: int | None = None) -> Backend:
    """`openai:URL#model` -> an endpoint; an lmmkit checkpoint or run folder -> LmmkitBackend; an HF
    image-text-to-text folder -> HFImageTextBackend; with `text_only` (judges), an HF causal-LM
    folder -> HFTextBackend. Anything else is an error saying what was expected."""
    if spec.startswith("openai:"):
        from lmmkit.eval.backends.openai_api import OpenAIBackend

        return OpenAIBackend(spec, api_key_env=api_key_env)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"{spec}: not a folder and not an openai:<URL>#<model> endpoint")
    if _is_lmmkit_checkpoint(path):
        from lmmkit.eval.backends.lmmkit_model import LmmkitBackend

        return LmmkitBackend.from_checkpoint(path, **({"batch_size": batch_size} if batch_size else {}))
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{spec}: neither an lmmkit checkpoint nor an HF model folder (no config.json)")
    try:
        from lmmkit.eval.backends.hf_model import HFImageTextBackend

        return HFImageTextBackend(path, **({"batch_size": batch_size} if batch_size else {}))
    except ValueError as err:
        if not text_only:
            raise
        arch = json.loads(config.read_text()).get("architectures") or []
        if not any(a.endswith("ForCausalLM") for a in arch):
            raise ValueError(f"{spec}: not an image-text-to-text or causal LM folder ({err})") from err
    from lmmkit.eval.backends.hf_text import HFTextBackend

    return HFTextBackend(path)


class BlindBackend:
    """Blind controls: every image replaced by a blank one of the same size ("blank"), or dropped so
    the model gets the question alone ("none"). A model that scores as well blind as sighted is
    answering from the question, not the image."""

    MODES = ("blank", "none")

    def __init__(self, inner: Backend, mode: str = "blank", colour: tuple[int, int, int] = (30, 30, 36)) -> None:
        if mode not in self.MODES:
            raise ValueError(f"blind mode must be one of {', '.join(self.MODES)}, not {mode!r}")
        self.inner = inner
        self.mode = mode
        self.name = f"{inner.name} ({'blank image' if mode == 'blank' else 'no image'})"
        self.colour = colour
        self.concurrency = getattr(inner, "concurrency", 1)

    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint()}:blind-{self.mode}"

    def _blank(self, image) -> Image.Image:
        size = image.size if isinstance(image, Image.Image) else Image.open(image).size
        return Image.new("RGB", size, self.colour)

    def generate(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        if self.mode == "none":
            return self.inner.generate([Request(r.prompt) for r in requests], settings)
        blind, bad = [], {}
        for i, r in enumerate(requests):
            try:
                blind.append(Request(r.prompt, [self._blank(im) for im in r.images]))
            except OSError as err:
                bad[i] = BackendError(f"cannot read image: {err}")
                blind.append(Request(r.prompt))
        out = self.inner.generate(blind, settings)
        return [bad.get(i, o) for i, o in enumerate(out)]
