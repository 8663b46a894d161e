"""What every model backend offers the harness: answers to (image, prompt) requests.

A backend is anything that turns a batch of requests into text: an lmmkit checkpoint, an HF
image-text-to-text folder, or an OpenAI-compatible endpoint. The harness never looks inside; it
keys its response cache on `fingerprint`, so two backends that could answer differently must
never share one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; part of every cache key. Benchmarks decode greedily (temperature 0)."""

    max_new_tokens: int = 64
    temperature: float = 0.0

    def key(self) -> str:
        return f"max_new_tokens={self.max_new_tokens};temperature={self.temperature}"


@dataclass
class Request:
    """One question to a model: zero or more images (paths or PIL images) and the user prompt.

    The prompt is the benchmark's text without any chat template or image tag: each backend
    places the image(s) the way its model expects.
    """

    prompt: str
    images: list[Path | Image.Image] = field(default_factory=list)


class BackendError(RuntimeError):
    """A backend could not answer one request (timeout, bad reply, unreadable image); names the item."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def fingerprint(self) -> str:
        """Identifies the weights/endpoint + model: responses are cached under it."""
        ...

    def generate(self, requests: Sequence[Request], settings: GenerationSettings) -> list[str | BackendError]:
        """One answer per request, in order; a failed request gives a BackendError in its slot."""
        ...


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_SAMPLE = 1 << 20


def fingerprint_files(paths: Sequence[Path]) -> str:
    """A digest of model files that is cheap even for 15 GB folders: each file's name, size, and
    the sha256 of its first and last MiB. (Retrained weights change all of these; hashing every
    byte of a 7B model would cost more than the eval it keys.) Non-weight files are hashed whole."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with p.open("rb") as f:
            if p.suffix in _WEIGHT_SUFFIXES and size > 2 * _SAMPLE:
                h.update(f.read(_SAMPLE))
                f.seek(size - _SAMPLE)
                h.update(f.read(_SAMPLE))
            else:
                h.update(f.read())
    return h.hexdigest()


def fingerprint_folder(folder: Path) -> str:
    """`fingerprint_files` over a model folder's config, tokenizer, chat template and weight files."""
    files = [p for p in Path(folder).iterdir()
             if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.suffix in (".json", ".jinja", ".model"))]
    if not files:
        raise FileNotFoundError(f"{folder}: no config or weight files to fingerprint")
    return fingerprint_files(files)


def cache_safe(text: str) -> str:
    """A fingerprint from a plain identifier (an endpoint URL + model name)."""
    return hashlib.sha256(text.encode()).hexdigest()
