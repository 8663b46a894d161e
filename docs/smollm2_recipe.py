"""Train a ShapesWorld VLM on SmolLM2-135M-Instruct: align (bridge only), then LoRA SFT.

    .venv/bin/python docs/smollm2_recipe.py --out runs/smollm2     (docs/smollm2.md has the figures)

Drives lmmkit's own functions (generate_shapes, build_vlm, run_stage, the eval harness). For the SFT
stage the LLM gets LoRA adapters; the stage then trains only them and the bridge (as `lmmkit train`
does with `train.lora_rank > 0`), and the checkpoint holds the merged weights, so it loads with
`lmmkit.train.checkpoint.load_model` like any other.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmmkit.config import config_from_dict, config_to_dict
from lmmkit.data.schema import Message
from lmmkit.data.shapes.bench import write_bench
from lmmkit.data.shapes.generate import generate_shapes
from lmmkit.data.templates import encode_prompt
from lmmkit.eval.backends.lmmkit_model import LmmkitBackend
from lmmkit.eval.backends.load import BlindBackend
from lmmkit.eval.cache import ResponseCache
from lmmkit.eval.report import format_table
from lmmkit.eval.runner import EvalOptions, run_eval
from lmmkit.eval.shapes import pope_by_split
from lmmkit.eval.tasks import get_tasks
from lmmkit.models.build import build_vlm, describe
from lmmkit.models.fetch import fetch_model
from lmmkit.models.lora import add_lora
from lmmkit.train.checkpoint import load_model
from lmmkit.train.features import FeatureCache
from lmmkit.train.loop import run_stage
from lmmkit.train.run import load_samples

QUESTION = "What is the capital of France?"


def text_answer(model, question: str = QUESTION, max_new_tokens: int = 24) -> str:
    """Greedy text-only answer through the VLM (no image): does the LLM still know things?"""
    ids = torch.tensor([encode_prompt(model.tokenizer, [Message("user", question)])])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(ids, torch.ones_like(ids), max_new_tokens=max_new_tokens)
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def pope(model, bench: Path, name: str, blank_control: bool) -> dict:
    backend = LmmkitBackend(model, fingerprint=f"in-training:{name}", name=name, progress=False)
    opts = EvalOptions(progress=False)
    out = {"model": pope_by_split(run_eval(get_tasks("pope"), backend, bench, ResponseCache(None),
                                           opts=opts)["tasks"]["pope"])}
    if blank_control:
        out["blind control (blank image)"] = pope_by_split(run_eval(
            get_tasks("pope"), BlindBackend(backend, "blank"), bench, ResponseCache(None), opts=opts)["tasks"]["pope"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/smollm2"))
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--n-pope-images", type=int, default=150)
    ap.add_argument("--align-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--align-lr", type=float, default=2e-3)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-after-align", action="store_true", help="also POPE after align (slow on CPU)")
    ap.add_argument("--align-from", type=Path, default=None,
                    help="a finished align checkpoint of this recipe (same data settings): skip the align stage")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    timings: dict[str, float] = {}
    t0 = last = time.time()

    def lap(name: str) -> None:
        nonlocal last
        timings[name] = round(time.time() - last, 1)
        last = time.time()
        print(f"[{name}: {timings[name]} s]", flush=True)

    data = a.out / "data"
    generate_shapes(data, seed=0, n_train=a.n_train, n_test=a.n_test, n_pope_images=a.n_pope_images)
    bench = write_bench(data)["pope"].parent
    lap("data")
    llm = str(fetch_model("smollm2-135m"))
    model = load_model(a.align_from) if a.align_from else build_vlm(llm, "shipped:vision", seed=0)
    print(f"model: {describe(model)}; {model.tokens_per_image} visual tokens per image")
    before = text_answer(model)
    images = data / "images"
    convs, _ = load_samples(model, data / "train" / "conversations.json", images, 512)
    cache = FeatureCache()
    cache.fill(model, [im for s in convs for im in s.images], desc="encode images (frozen tower)")
    lap("load model, tokenize, encode images")

    def cfg(stage: str, file: str, steps: int, lr: float, init_from: str | None) -> dict:
        return config_to_dict(config_from_dict({
            "model": {"llm": llm, "vision": "shipped:vision"},
            "data": {"train": str(data / "train" / file), "image_folder": str(images)},
            "train": {"stage": stage, "max_steps": steps, "batch_size": a.batch_size, "lr": lr,
                      "output_dir": str(a.out / stage), "init_from": init_from}}, source="smollm2 recipe",
            base=Path.cwd()))

    stages = []
    if a.align_from:
        align_checkpoint = a.align_from
    else:
        captions, _ = load_samples(model, data / "train" / "captions.json", images, 512)
        r = run_stage(model, captions, stage="align", output_dir=a.out / "align", batch_size=a.batch_size,
                      config=cfg("align", "captions.json", a.align_steps, a.align_lr, None),
                      lr=a.align_lr, max_steps=a.align_steps, cache=cache)
        stages.append(r)
        align_checkpoint = r.checkpoint
        lap("align")
    results: dict = {"pope": {}}
    if a.eval_after_align:
        results["pope"]["after align only"] = pope(model, bench, "after align", False)["model"]
        lap("pope after align")
    adapted = add_lora(model.llm, rank=a.lora_rank, alpha=a.lora_alpha)
    sft_cfg = cfg("sft", "conversations.json", a.sft_steps, a.sft_lr, str(align_checkpoint))
    sft_cfg["train"].update(lora_rank=a.lora_rank, lora_alpha=a.lora_alpha)
    r = run_stage(model, convs, stage="sft", output_dir=a.out / "sft", batch_size=a.batch_size,
                  config=sft_cfg, lr=a.sft_lr, max_steps=a.sft_steps, cache=cache)
    stages.append(r)
    lap("lora sft")
    model.eval()
    final = pope(model, bench, "after lora sft", True)
    results["pope"].update({"model": final["model"], "blind control (blank image)":
                            final["blind control (blank image)"]})
    lap("pope + blank-image control")
    results.update({
        "text_answer": {"question": QUESTION, "before": before, "after": text_answer(model)},
        "stages": [{"name": x.stage, "steps": x.steps, "final_loss": round(x.final_loss, 4),
                    "seconds": round(x.seconds, 1), "seconds_per_step": round(x.seconds / x.steps, 2),
                    "tokens_per_second": round(x.tokens_per_second), "checkpoint": str(x.checkpoint)}
                   for x in stages],
        "loss_curves": {x.stage: [[s, round(v, 4)] for s, v in x.losses] for x in stages},
        "lora": {"rank": a.lora_rank, "alpha": a.lora_alpha, "modules": len(adapted)},
        "settings": {k: str(v) for k, v in vars(a).items()}, "timings": timings,
        "wall_seconds": round(time.time() - t0, 1),
    })
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(json.dumps({k: results[k] for k in ("text_answer", "stages", "timings", "wall_seconds")}, indent=2))


if __name__ == "__main__":
    main()
