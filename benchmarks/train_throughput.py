"""Training throughput: HF transformers' LlavaForConditionalGeneration in a plain user loop vs lmmkit's run_stage.

    .venv/bin/python benchmarks/train_throughput.py            # the figures in docs/performance.md
    .venv/bin/python benchmarks/train_throughput.py --quick    # a smoke run (seconds)

Both sides train the same weights (lmmkit builds the model, exports it as an HF Llava folder, HF loads that) on
the same ShapesWorld conversations (sft) and captions (align), same batch size, optimizer, bf16 autocast,
clipping and thread count. HF is written as a user would: LlavaProcessor on each batch (chat template, image
loading and preprocessing), padding to the longest, the tower frozen but run every step (HF has no feature
cache). lmmkit: run_stage with cached tower features and length grouping; packing is measured as a third row.
Tokens/s counts real (non-pad) tokens, text and image, timed after `--warmup` steps; each figure is the median
of `--repeats` runs, the two sides interleaved so load changes hit both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmmkit.train.features import FeatureCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

PROMPTS = {"human": "user", "gpt": "assistant"}


def hf_run(folder: Path, records: list[dict], images: Path, stage: str, batch_size: int, steps: int, warmup: int,
           lr: float, seed: int) -> dict:
    """A plain HF training loop; tokens/s over the steps after warmup."""
    import time

    from PIL import Image
    from torch.utils.data import DataLoader
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, get_cosine_schedule_with_warmup

    with bc.quiet():
        model = LlavaForConditionalGeneration.from_pretrained(folder)
        processor = LlavaProcessor.from_pretrained(folder)
    model.train()
    model.requires_grad_(False)
    trained = [model.model.multi_modal_projector]
    if stage == "sft":  # the tower stays frozen, as in LLaVA's stage 2
        trained += [model.model.language_model, model.lm_head]
    for module in trained:
        module.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, warmup + steps)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def collate(batch: list[dict]) -> dict:
        texts = [processor.apply_chat_template([{"role": PROMPTS[t["from"]], "content": t["value"]}
                                                for t in r["conversations"]], tokenize=False) for r in batch]
        pictures = [Image.open(images / r["image"]).convert("RGB") for r in batch]
        inputs = processor(text=texts, images=pictures, padding="longest", return_tensors="pt")
        labels = inputs["input_ids"].clone()
        labels[(inputs["attention_mask"] == 0) | (labels == image_id)] = -100
        inputs["labels"] = labels
        return inputs

    loader = DataLoader(records, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    # Where HF's step time goes (after warmup): preparing the batch, the frozen tower, the rest (LLM + optimizer).
    spent = {"data": 0.0, "tower": 0.0}
    tower_start: list[float] = []
    tower = model.model.vision_tower
    tower.register_forward_pre_hook(lambda *_: tower_start.append(time.perf_counter()))
    tower.register_forward_hook(lambda *_: spent.__setitem__("tower", spent["tower"] + time.perf_counter()
                                                             - tower_start.pop()))
    tokens, positions, start, step = 0, 0, 0.0, 0
    while step < warmup + steps:
        batches = iter(loader)
        while step < warmup + steps:
            if step == warmup:
                start = time.perf_counter()
                spent = {"data": 0.0, "tower": 0.0}
            fetch = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            spent["data"] += time.perf_counter() - fetch
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                tokens += int(batch["attention_mask"].sum())
                positions += batch["input_ids"].numel()
            step += 1
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps, "positions_per_step": positions / steps,
            "data_share": spent["data"] / seconds, "tower_share": spent["tower"] / seconds, "final_loss": loss.item()}


def same_tokens(folder: Path, records: list[dict], samples: list, images: Path, n: int = 16) -> float:
    """Share of the first n records whose HF processor input ids equal lmmkit's encoding (the same work)."""
    from PIL import Image
    from transformers import LlavaProcessor

    with bc.quiet():
        processor = LlavaProcessor.from_pretrained(folder)
    by_id = {s.id: s for s in samples}
    same = 0
    for r in records[:n]:
        text = processor.apply_chat_template([{"role": PROMPTS[t["from"]], "content": t["value"]}
                                             for t in r["conversations"]], tokenize=False)
        ids = processor(text=[text], images=[Image.open(images / r["image"]).convert("RGB")])["input_ids"][0]
        same += list(ids) == by_id[r["id"]].input_ids
    return same / min(n, len(records))


def lmmkit_run(llm_dir: Path, vision_dir: Path, samples: list, cache: FeatureCache, stage: str, batch_size: int, steps: int,
               warmup: int, lr: float, seed: int, packing: bool, max_length: int, work: Path,
               compile_layers: bool = False) -> dict:
    from lmmkit.models.build import build_vlm
    from lmmkit.train.compiled import compile_decoder_layers
    from lmmkit.train.loop import LMObjective
    from lmmkit.train.packing import PackedLMObjective

    with bc.quiet():
        model = build_vlm(str(llm_dir), str(vision_dir), vision_select_layer=-2, seed=0)
    if compile_layers:  # train.compile; compiled during the warm-up steps, outside the timed window
        compile_decoder_layers(model.llm)
    objective = PackedLMObjective(model, max_length) if packing else LMObjective()
    return bc.run_stage_rate(model, samples, cache, stage, objective, batch_size, steps, warmup, lr, seed,
                             work / f"run-{stage}-{'packed' if packing else 'padded'}{'-compiled' * compile_layers}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny model, few steps, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lmmkit-bench")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--compile", action="store_true",
                    help="also time lmmkit with train.compile (the LLM's decoder layers through torch.compile)")
    args = ap.parse_args(argv)
    args.warmup = max(1, args.warmup)  # the timed window starts after a logged step
    if args.quick:
        args.repeats, args.steps, args.warmup, args.batch_size = 1, 2, 1, 4
        args.hidden, args.layers, args.n_train = 64, 1, 16
    bc.setup(args.threads)
    from lmmkit.train.features import FeatureCache
    from lmmkit.train.run import load_samples

    data = bc.shapes_data(args.work, args.n_train, 8, 0)
    tower_hidden = max(64, args.hidden // 2)
    llm_dir, vision_dir = bc.save_parts(args.work / "parts", args.hidden, args.layers, tower_hidden, args.layers)
    export = args.work / f"hf-llava-{args.hidden}x{args.layers}"
    model = bc.build_and_export(llm_dir, vision_dir, export)
    info = bc.machine(args.threads)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "stages": {}}
    rows: list[tuple[str, str]] = []
    for stage, file in (("sft", "conversations.json"), ("align", "captions.json")):
        records = json.loads((data / "train" / file).read_text())
        with bc.quiet():
            samples, _ = load_samples(model, data / "train" / file, data / "images", 512)
        agreement = same_tokens(export, records, samples, data / "images")
        cache = FeatureCache()
        with bc.quiet():
            cache_seconds, _ = bc.timed(lambda s=samples, c=cache: c.fill(model, [im for x in s for im in x.images]))
        variants = [(False, False, "lmmkit"), (True, False, "lmmkit_packed")]
        if args.compile:
            variants.append((False, True, "lmmkit_compiled"))
        runs: dict[str, list[dict]] = {"hf": [], **{key: [] for _, _, key in variants}}
        loads = []
        for rep in range(args.repeats):
            loads.append(bc.load_now())
            seed = rep
            runs["hf"].append(hf_run(export, records, data / "images", stage, args.batch_size, args.steps,
                                     args.warmup, 1e-4, seed))
            for packing, compiled, key in variants:
                runs[key].append(lmmkit_run(llm_dir, vision_dir, samples, cache, stage, args.batch_size, args.steps,
                                            args.warmup, 1e-4, seed, packing, 512, args.work, compile_layers=compiled))
        loads.append(bc.load_now())
        summary = {k: {m: bc.median([r[m] for r in v]) for m in v[0]} for k, v in runs.items()}
        summary["ratio"] = summary["lmmkit"]["tokens_per_s"] / summary["hf"]["tokens_per_s"]
        summary["ratio_packed"] = summary["lmmkit_packed"]["tokens_per_s"] / summary["hf"]["tokens_per_s"]
        if args.compile:
            summary["ratio_compiled"] = summary["lmmkit_compiled"]["tokens_per_s"] / summary["hf"]["tokens_per_s"]
        summary["cache_fill_seconds"] = cache_seconds
        summary["same_input_ids"] = agreement
        summary["images"] = len(cache)
        summary["load_avg_1m"] = loads
        summary["runs"] = runs
        results["stages"][stage] = summary
        target = 1.5 if stage == "sft" else 3.0
        for key in ("hf", *(key for _, _, key in variants)):
            s = summary[key]
            rows.append((f"{stage} {key}", f"{s['tokens_per_s']:8.0f} tok/s   {s['tokens_per_step']:6.0f} tokens and "
                         f"{s['positions_per_step']:6.0f} positions per step"))
        hf = summary["hf"]
        rows.append((f"{stage} hf step time", f"{hf['data_share']:.0%} batch preparation (processor), "
                     f"{hf['tower_share']:.0%} frozen tower, the rest LLM + optimizer; input ids equal to lmmkit's "
                     f"for {agreement:.0%} of records"))
        rows.append((f"{stage} ratio lmmkit/hf", f"{summary['ratio']:.2f}x (target >= {target}x: "
                     f"{'met' if summary['ratio'] >= target else 'MISSED'}); packed {summary['ratio_packed']:.2f}x"
                     + (f"; compiled {summary['ratio_compiled']:.2f}x" if args.compile else "")))
        step_seconds = summary["lmmkit"]["tokens_per_step"] / summary["lmmkit"]["tokens_per_s"]
        rows.append((f"{stage} feature cache", f"{cache_seconds:.2f} s once for {len(cache)} images "
                     f"(= {cache_seconds / step_seconds:.1f} lmmkit steps); load " + ", ".join(map(str, loads))))
    bc.report("train throughput: HF Llava loop vs lmmkit run_stage", info, rows, args.json, results)
    return results


if __name__ == "__main__":
    main()
