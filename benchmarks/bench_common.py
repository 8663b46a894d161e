"""What the benchmark scripts share: ShapesWorld data, the benchmark model (saved HF parts and its HF Llava
export, so both sides hold identical weights), the machine's state, medians and the printed table."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmmkit.models.vlm import VisionLanguageModel
    from lmmkit.train.features import FeatureCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing


def setup(threads: int) -> None:
    """Same conditions for both sides of every comparison: the thread count, quiet libraries."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def machine(threads: int) -> dict:
    """The machine and its load: the numbers only mean something next to these (the machine is shared)."""
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": threads,
            "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow the libraries' progress output (weight loading, stage summaries) inside timed work."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    return statistics.median(values)


def shapes_data(root: Path, n_train: int, n_test: int, n_pope_images: int) -> Path:
    """A ShapesWorld dataset at `root`, generated once per size (deterministic by seed 0)."""
    from lmmkit.data.shapes.generate import generate_shapes

    folder = root / f"shapes-{n_train}-{n_test}-{n_pope_images}"
    if not (folder / "world.json").exists():
        with quiet():
            generate_shapes(folder, seed=0, n_train=n_train, n_test=n_test, n_pope_images=n_pope_images, workers=1,
                            progress=False)
    return folder


def save_parts(folder: Path, hidden: int, layers: int, tower_hidden: int, tower_layers: int,
               llm: str | None = None, image_size: int = 64, patch: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """An LLM folder (a Llama of the given shape with the shipped tokenizer, or `llm` as is) and a CLIP tower
    folder (image_size px, patch `patch`, PIL processor), created once."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from lmmkit.models.parts import part_path

    llm_dir = Path(llm) if llm else folder / f"llama-{hidden}x{layers}"
    vision_dir = folder / f"clip-{image_size}-{patch}-{tower_hidden}x{tower_layers}"
    if llm is None and not (llm_dir / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(part_path("lm"))
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                             num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
                             tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        LlamaForCausalLM(config).save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
    if not (vision_dir / "config.json").exists():
        torch.manual_seed(seed + 1)
        config = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=tower_hidden,
                                  intermediate_size=4 * tower_hidden, num_hidden_layers=tower_layers,
                                  num_attention_heads=max(1, tower_hidden // 64))
        CLIPVisionModel(config).save_pretrained(vision_dir)
        CLIPImageProcessorPil(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size}).save_pretrained(vision_dir)
    return llm_dir, vision_dir


def build_and_export(llm_dir: Path, vision_dir: Path, export_dir: Path, seed: int = 0) -> VisionLanguageModel:
    """The lmmkit model on these parts (LLaVA's penultimate tower layer) and its HF Llava export."""
    from lmmkit.models.build import build_vlm
    from lmmkit.models.export_hf import export_llava

    with quiet():
        model = build_vlm(str(llm_dir), str(vision_dir), vision_select_layer=-2, seed=seed)
        export_llava(model, export_dir, overwrite=True)
    return model


def report(title: str, info: dict, rows: list[tuple[str, str]], out: Path | None, results: dict) -> None:
    """Print the figures as a small table and, with --json, write them with the machine's state."""
    print(f"\n== {title}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"title": title, "machine": info, **results}, indent=2) + "\n")


class _Counting:
    """Wraps an lmmkit objective to count the positions computed (padding included) after warmup."""

    def __init__(self, inner: Any, warmup: int) -> None:
        self.inner, self.warmup, self.calls, self.positions = inner, warmup, 0, 0
        self.length_group = getattr(inner, "length_group", 32)

    def length(self, sample: Any) -> int:
        return self.inner.length(sample)

    def batch(self, model: VisionLanguageModel, samples: list, cache: FeatureCache | None, pad_id: int) -> dict:
        batch = self.inner.batch(model, samples, cache, pad_id)
        if self.calls >= self.warmup:
            self.positions += batch["input_ids"].numel()
        self.calls += 1
        return batch

    def loss(self, wrapped: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.inner.loss(wrapped, batch)


def run_stage_rate(model: VisionLanguageModel, samples: list, cache: FeatureCache | None, stage: str, objective: Any,
                   batch_size: int, steps: int, warmup: int, lr: float, seed: int, out: Path) -> dict:
    """lmmkit's run_stage for warmup + steps (bf16, cached features); tokens/s over the steps after warmup, from
    its own metrics (tokens so far and elapsed seconds per step), and the positions computed per step."""
    from accelerate.state import AcceleratorState

    from lmmkit.train.loop import run_stage

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per run, as a fresh process
    counting = _Counting(objective, warmup)
    with quiet():
        run_stage(model, samples, stage=stage, output_dir=out, config={}, batch_size=batch_size, lr=lr,
                  max_steps=warmup + steps, warmup_ratio=0.0, seed=seed, cache=cache, precision="bf16",
                  log_every=1, progress=False, objective=counting)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (out / "metrics.jsonl").unlink()
    first, last = lines[warmup - 1], lines[-1]
    tokens = last["tokens"] - first["tokens"]  # exact counts (rate x rounded elapsed is not, on short runs)
    seconds = last["elapsed"] - first["elapsed"]
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps,
            "positions_per_step": counting.positions / steps, "final_loss": last["loss"]}
