"""What packing does on the demo: padding per step over a whole epoch of the demo's data, and tokens/s of
lmmkit's run_stage padded (length-grouped, the default) vs packed, on the shipped parts.

    .venv/bin/python benchmarks/packing_demo.py            # the figures in docs/performance.md
    .venv/bin/python benchmarks/packing_demo.py --quick    # a smoke run (seconds)

The demo's settings: ShapesWorld (8000 training images), the shipped LM and tower, batch 64, max_length 512,
align on captions and sft on conversations, cached tower features, bf16. Padding is counted exactly for every
step of epoch 0 (no model needed); tokens/s is timed over `--steps` steps after `--warmup`, median of
`--repeats` runs, the two layouts interleaved.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def epoch_padding(lengths: list[int], batch_size: int, max_length: int, seed: int) -> dict:
    """Real tokens and computed positions per step over epoch 0, padded (lmmkit's length-grouped batches) and
    packed (plain-shuffled batches, pack_rows), as run_stage lays them out."""
    from lmmkit.data.collate import PAD_MULTIPLE
    from lmmkit.train.batches import batch_order
    from lmmkit.train.packing import pack_rows

    def width(n: int) -> int:
        return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE

    out = {}
    for mode, group in (("padded", 32), ("packed", 1)):
        batches = batch_order(len(lengths), batch_size, seed, 0, lengths, group)
        real = positions = rows = 0
        for batch in batches:
            sizes = [lengths[i] for i in batch]
            real += sum(sizes)
            if mode == "padded":
                positions += len(batch) * width(max(sizes))
                rows += len(batch)
            else:
                packed = pack_rows(sizes, max_length)
                positions += len(packed) * width(max(sum(sizes[i] for i in row) for row in packed))
                rows += len(packed)
        steps = len(batches)
        out[mode] = {"tokens_per_step": real / steps, "positions_per_step": positions / steps,
                     "rows_per_step": rows / steps, "padding_share": 1 - real / positions}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, few steps, one repeat")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lmmkit-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.warmup = max(1, args.warmup)  # the timed window starts after a logged step
    if args.quick:
        args.n_train, args.batch_size, args.steps, args.warmup, args.repeats = 64, 8, 2, 1, 1
    bc.setup(args.threads)
    from lmmkit.models.build import build_vlm
    from lmmkit.train.features import FeatureCache
    from lmmkit.train.loop import LMObjective
    from lmmkit.train.packing import PackedLMObjective
    from lmmkit.train.run import load_samples

    data = bc.shapes_data(args.work, args.n_train, 8, 0)
    with bc.quiet():
        model = build_vlm("shipped:lm", "shipped:vision")
    info = bc.machine(args.threads)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    rows: list[tuple[str, str]] = []
    for stage, file in (("align", "captions.json"), ("sft", "conversations.json")):
        with bc.quiet():
            samples, _ = load_samples(model, data / "train" / file, data / "images", args.max_length)
        padding = epoch_padding([len(s.input_ids) for s in samples], args.batch_size, args.max_length, 0)
        cache = FeatureCache()
        with bc.quiet():
            cache.fill(model, [im for s in samples for im in s.images])
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        loads = [bc.load_now()]
        for rep in range(args.repeats):
            for mode in runs:
                with bc.quiet():
                    fresh = build_vlm("shipped:lm", "shipped:vision")
                objective = PackedLMObjective(fresh, args.max_length) if mode == "packed" else LMObjective()
                runs[mode].append(bc.run_stage_rate(fresh, samples, cache, stage, objective, args.batch_size,
                                                    args.steps, args.warmup, 1e-3, rep, args.work / f"demo-{mode}"))
        loads.append(bc.load_now())
        rate = {mode: bc.median([r["tokens_per_s"] for r in v]) for mode, v in runs.items()}
        results[stage] = {"padding": padding, "tokens_per_s": rate, "runs": runs, "load_avg_1m": loads,
                          "samples": len(samples)}
        for mode in ("padded", "packed"):
            p = padding[mode]
            rows.append((f"{stage} {mode}", f"{p['tokens_per_step']:6.0f} tokens in {p['positions_per_step']:6.0f} "
                         f"positions per step ({p['rows_per_step']:.1f} rows, {p['padding_share']:.1%} padding); "
                         f"{rate[mode]:6.0f} tok/s"))
        saved = 1 - padding["packed"]["positions_per_step"] / padding["padded"]["positions_per_step"]
        rows.append((f"{stage} packing", f"{saved:.1%} fewer positions per step; tokens/s x{rate['packed'] / rate['padded']:.2f}"
                     f"; load " + ", ".join(map(str, loads))))
    bc.report("packing on the demo (shipped parts, ShapesWorld)", info, rows, args.json, results)
    return results


if __name__ == "__main__":
    main()
