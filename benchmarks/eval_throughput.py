"""POPE-style evaluation throughput: HF transformers' generate, one question at a time (lmms-eval's default for
llava_hf), vs lmmkit's batched answering with each image encoded once.

    .venv/bin/python benchmarks/eval_throughput.py            # the figures in docs/performance.md
    .venv/bin/python benchmarks/eval_throughput.py --quick    # a smoke run (seconds)

The model: the shipped ShapesWorld LM (pretrained, so it answers "Yes" / "No" and stops, as a real model
would) with a tiny CLIP tower and an untrained MLP bridge; lmmkit builds it and exports it as an HF Llava
folder, which HF loads, so both hold identical weights. The questions: ShapesWorld's POPE files, six per image.
Both sides run greedy decoding under the same bf16 autocast and thread count; the answers are compared
string for string. Each figure is the median of `--repeats` runs, the two sides interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmmkit.models.vlm import VisionLanguageModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SHORT_ANSWER = "Answer the question using a single word or phrase."


def hf_answers(folder: Path, items: list[tuple[Path, str]], max_new_tokens: int) -> tuple[float, list[str]]:
    """lmms-eval's llava_hf loop at batch size 1: processor, generate, decode, for every question."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with bc.quiet():
        model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        processor = AutoProcessor.from_pretrained(folder)
    answers = []
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for image, question in items:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(images=[Image.open(image).convert("RGB")], text=prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=processor.tokenizer.pad_token_id)
            answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return time.perf_counter() - start, answers


def lmmkit_answers(model: VisionLanguageModel, items: list[tuple[Path, str]], max_new_tokens: int,
                   batch_size: int) -> tuple[float, list[str]]:
    """lmmkit's evaluation path: a fresh feature cache (each image encoded once, timed), left-padded batches."""
    from lmmkit.eval.generation import answer_questions
    from lmmkit.train.features import FeatureCache

    start = time.perf_counter()
    answers = answer_questions(model, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               cache=FeatureCache(), progress=False)
    return time.perf_counter() - start, answers


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few images, one repeat")
    ap.add_argument("--images", type=int, default=50, help="POPE images (six questions each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="lmmkit's answering batch")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lmmkit-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.max_new_tokens = 2, 1, 4
    bc.setup(args.threads)
    from lmmkit.specs import SHIPPED_LM

    data = bc.shapes_data(args.work, 0, max(50, args.images), max(50, args.images))
    rows = [json.loads(line) for line in (data / "test" / "pope_random.jsonl").read_text().splitlines()]
    images = list(dict.fromkeys(r["image"] for r in rows))[:args.images]
    items = [(data / "images" / r["image"], f"{r['text']}\n{SHORT_ANSWER}") for r in rows if r["image"] in images]
    from lmmkit.models.build import resolve_part

    llm_dir, vision_dir = bc.save_parts(args.work / "parts", 0, 0, 128, 2, llm=str(resolve_part(SHIPPED_LM)))
    export = args.work / "hf-llava-shipped-lm"
    model = bc.build_and_export(llm_dir, vision_dir, export)
    info = bc.machine(args.threads)
    runs: dict[str, list[float]] = {"hf": [], "lmmkit": []}
    loads = []
    for _ in range(args.repeats):
        loads.append(bc.load_now())
        seconds, theirs = hf_answers(export, items, args.max_new_tokens)
        runs["hf"].append(seconds)
        seconds, ours = lmmkit_answers(model, items, args.max_new_tokens, args.batch_size)
        runs["lmmkit"].append(seconds)
    loads.append(bc.load_now())
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(items)
    hf_s, ours_s = bc.median(runs["hf"]), bc.median(runs["lmmkit"])
    ratio = hf_s / ours_s
    answers = sorted({a for a in ours})[:6]
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "questions": len(items),
               "images": len(images), "seconds": runs, "median_seconds": {"hf": hf_s, "lmmkit": ours_s},
               "ratio": ratio, "agreement": agree, "load_avg_1m": loads,
               "disagreements": [(str(q), a, b) for (_, q), a, b in zip(items, ours, theirs, strict=True) if a != b][:10]}
    table = [
        ("questions", f"{len(items)} ({len(images)} images x 6)"),
        ("hf generate, one at a time", f"{hf_s:7.2f} s  {len(items) / hf_s:7.1f} questions/s"),
        ("lmmkit batched, image cached", f"{ours_s:7.2f} s  {len(items) / ours_s:7.1f} questions/s"),
        ("ratio lmmkit/hf", f"{ratio:.2f}x (target >= 4x: {'met' if ratio >= 4 else 'MISSED'})"),
        ("answers identical", f"{agree:.1%} (e.g. {', '.join(map(repr, answers))})"),
        ("load (1 min avg)", ", ".join(map(str, loads))),
    ]
    bc.report("eval throughput: POPE, HF generate one at a time vs lmmkit batched", info, table, args.json, results)
    return results


if __name__ == "__main__":
    main()
