"""Image preprocessing throughput: lmmkit (highres.anyres_tiles + the tower's processor, with its input-size fast
path) vs transformers' LlavaNextImageProcessor on the same images, checked to give the same pixels.

    .venv/bin/python benchmarks/preprocess_throughput.py            # the figures in docs/performance.md
    .venv/bin/python benchmarks/preprocess_throughput.py --quick    # a smoke run (seconds)

AnyRes: a 336-pixel CLIP tower with LLaVA-1.6's grid pinpoints, on photo-sized images of several aspect ratios
(each becomes a base view plus 2-3 tiles). lmmkit's AnyResVisionTower.preprocess is compared with a
LlavaNextImageProcessor set to the same tiling (lmmkit's LlavaNext export builds exactly this one). Without
torchvision installed, transformers gives its PIL backend for LlavaNextImageProcessor; that is what runs here.
Fixed size: 64-pixel ShapesWorld images through lmmkit's VisionTower.preprocess vs the same CLIP processor
called directly (what LlavaProcessor does). Each figure is the median of `--repeats` timings, interleaved.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image
    from transformers import LlavaNextImageProcessor

    from lmmkit.models.anyres_tower import AnyResVisionTower

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

# (height, width): COCO-like photos in both orientations, a wide panorama and a tall page.
SIZES = [(480, 640), (640, 480), (427, 640), (500, 375), (336, 1008), (900, 300), (612, 612), (375, 500)]


def photos(n: int, seed: int = 0) -> list[Image.Image]:
    """n images with smooth gradients and noise (so resampling filters have real work to do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1)
        noise = rng.integers(-40, 40, (h, w, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return out


def anyres_pair(work: Path) -> tuple[AnyResVisionTower, LlavaNextImageProcessor]:
    """lmmkit's AnyRes tower (tiny weights: only its preprocessing runs) and the matching HF processor."""
    from transformers import LlavaNextImageProcessor

    from lmmkit.models.anyres_tower import AnyResVisionTower
    from lmmkit.models.vision import VisionTower

    _, vision_dir = bc.save_parts(work / "parts", 0, 0, 64, 1, llm="unused", image_size=336, patch=14)
    with bc.quiet():
        tower = AnyResVisionTower(VisionTower.from_pretrained(vision_dir))
        source = tower.processor
        hf = LlavaNextImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=[list(p) for p in tower.grid.pinpoints], resample=source.resample, do_pad=True,
            image_mean=source.image_mean, image_std=source.image_std, rescale_factor=source.rescale_factor)
    return tower, hf


def same_anyres(tower: AnyResVisionTower, ours: torch.Tensor, theirs: torch.Tensor, images: list[Image.Image]) -> bool:
    """lmmkit's flat (views, 3, S, S) batch against HF's (images, max views, 3, S, S), padding views ignored."""
    k = 0
    for i, n in enumerate(tower.views_per_image([(im.height, im.width) for im in images])):
        if not torch.equal(ours[k:k + n], theirs[i, :n]):
            return False
        k += n
    return k == ours.shape[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few images, one repeat")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lmmkit-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 4, 1
    bc.setup(args.threads)
    from PIL import Image

    from lmmkit.models.vision import VisionTower

    images = photos(args.images)
    tower, hf = anyres_pair(args.work)
    data = bc.shapes_data(args.work, 0, max(8, args.images), 0)
    shapes = [Image.open(p).convert("RGB") for p in sorted((data / "images" / "test").glob("*.png"))[:args.images]]
    _, small_dir = bc.save_parts(args.work / "parts", 0, 0, 128, 2, llm="unused")
    with bc.quiet():
        small = VisionTower.from_pretrained(small_dir)
    info = bc.machine(args.threads)
    cases = {
        "anyres": (lambda: tower.preprocess(images), lambda: hf(images=images, return_tensors="pt")["pixel_values"]),
        "fixed 64px": (lambda: small.preprocess(shapes),
                       lambda: small.processor(images=shapes, return_tensors="pt")["pixel_values"]),
    }
    times: dict[str, dict[str, list[float]]] = {c: {"lmmkit": [], "hf": []} for c in cases}
    outputs: dict[str, dict[str, torch.Tensor]] = {c: {} for c in cases}
    loads = [bc.load_now()]
    for case, (ours, theirs) in cases.items():
        ours(), theirs()  # warm up (first-call imports and allocations)
        for _ in range(args.repeats):
            for side, fn in (("lmmkit", ours), ("hf", theirs)):
                seconds, out = bc.timed(fn)
                times[case][side].append(seconds)
                outputs[case][side] = out
    loads.append(bc.load_now())
    same = {"anyres": same_anyres(tower, outputs["anyres"]["lmmkit"], outputs["anyres"]["hf"], images),
            "fixed 64px": torch.equal(outputs["fixed 64px"]["lmmkit"], outputs["fixed 64px"]["hf"])}
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "times": times, "same_pixels": same,
               "load_avg_1m": loads, "hf_processor": type(hf).__name__, "views": int(outputs["anyres"]["lmmkit"].shape[0])}
    rows = []
    for case in cases:
        ours_s, hf_s = bc.median(times[case]["lmmkit"]), bc.median(times[case]["hf"])
        n = len(images) if case == "anyres" else len(shapes)
        results[case] = {"lmmkit_s": ours_s, "hf_s": hf_s, "ratio": hf_s / ours_s, "images_per_s": n / ours_s}
        rows.append((f"{case} lmmkit", f"{ours_s * 1000:8.1f} ms  {n / ours_s:7.1f} images/s"))
        rows.append((f"{case} hf", f"{hf_s * 1000:8.1f} ms  {n / hf_s:7.1f} images/s  ({type(hf).__name__ if case == 'anyres' else type(small.processor).__name__})"))
        target = " (target >= 2x: " + ("met)" if hf_s / ours_s >= 2 else "MISSED)") if case == "anyres" else ""
        rows.append((f"{case} ratio lmmkit/hf", f"{hf_s / ours_s:.2f}x{target}; same pixels: {same[case]}"))
    rows.append(("anyres views", f"{results['views']} views of {len(images)} images (336 px, LLaVA-1.6 pinpoints)"))
    rows.append(("load (1 min avg)", ", ".join(map(str, loads))))
    bc.report("preprocess throughput: lmmkit vs transformers' image processors", info, rows, args.json, results)
    return results


if __name__ == "__main__":
    main()
