"""Data throughput: samples/s of decoding + preprocessing from WebDataset shards, lmmkit's pipeline vs a plain loop.

    nice -n 5 .venv/bin/python benchmarks/data_throughput.py            # the figures in docs/data.md
    nice -n 5 .venv/bin/python benchmarks/data_throughput.py --quick    # a smoke run (seconds)

The shards are written by this script: photo-like JPEGs (smooth shapes, mild noise, quality 90) at COCO-like
sizes and a few panoramas, 100 per shard, each with a caption. Both sides turn every image into the pixels
of a CLIP image processor built here (224 px by default, `--size 336` for LLaVA-1.5's).

- plain: read the tars with tarfile, `PIL.Image.open(...).convert("RGB")` and the HF processor per sample.
- lmmkit: a one-source `MixtureLoader` (what training streams) with `--workers` DataLoader workers, batches of
  `--batch`, `PixelTransform(normalise=False)` and `collate_pixels` in the workers (uint8 crops travel), and
  `normalise_pixels` in the main process: the processor's float pixels, bit for bit (checked).
- lmmkit, 0 workers: the same pipeline in one process (what the per-sample work alone gains).
- lmmkit, draft: as lmmkit, with JPEGs decoded at a reduced DCT scale that still covers the resize (an
  approximation: the mean and largest pixel difference are printed); also in one process.

The machine is shared: next to the load average, the script measures how much of a second core it gives right
now (the same CPU-bound job twice in a row vs in two processes at once), before and after the timings.

Every figure is the median of `--repeats` passes over all images, the sides interleaved; worker start-up is
inside the timing. The target is lmmkit >= 3x plain with 2 workers. Next to samples/s the script gives the CPU
time per sample of all the processes a side uses (main + workers): unlike wall time, it does not depend on how
busy the machine is.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

# (height, width): COCO-like photos in both orientations, a panorama and a tall page (as preprocess_throughput).
SIZES = [(480, 640), (640, 480), (427, 640), (500, 375), (336, 1008), (900, 300), (612, 612), (375, 500)]
PER_SHARD = 100  # at most; small runs use 4 shards so that each worker has whole shards


def photo(i: int, rng: np.random.Generator):
    """A photo-like picture: gradients, a few soft discs, mild noise, a slight blur (JPEG sizes like real photos)."""
    from PIL import Image, ImageFilter

    h, w = SIZES[i % len(SIZES)]
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255.0 / w, yy * 255.0 / h, (xx + yy) * 127.0 / (h + w)], -1)
    for _ in range(12):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, max(11, min(h, w) // 3))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[disc] = img[disc] * 0.4 + rng.integers(0, 256, 3) * 0.6
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def write_shards(folder: Path, n: int) -> list[Path]:
    """n JPEG samples (KEY.jpg + KEY.txt, img2dataset's layout) in shards of up to 100, written once per size."""
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()).get("n") == n:
        return sorted(folder.glob("*.tar"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = min(PER_SHARD, -(-n // 4))
    for s in range(-(-n // per)):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                buf = io.BytesIO()
                photo(i, rng).save(buf, "JPEG", quality=90)
                for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"photo number {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    done.write_text(json.dumps({"n": n}))
    return sorted(folder.glob("*.tar"))


def _spin(n: int = 2_000_000) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def two_core_scaling() -> float:
    """How much of a second core this machine gives right now: a fixed CPU-bound job done twice in a row vs in
    two processes at once (2.0 = two free cores; about 1.0 when other jobs hold the second)."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("fork")
    start = time.perf_counter()
    _spin(), _spin()
    serial = time.perf_counter() - start
    start = time.perf_counter()
    procs = [ctx.Process(target=_spin) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return serial / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """CPU time used so far by this process and its finished children (the DataLoader workers, once joined)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def processor(size: int):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def plain_loop(shards: list[Path], proc, keep: int = 0) -> tuple[int, dict[str, torch.Tensor]]:
    """What a script without a pipeline does: each tar member, PIL open, the processor, one sample at a time."""
    from PIL import Image

    n, kept = 0, {}
    for shard in shards:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                data = tar.extractfile(member).read()
                image = Image.open(io.BytesIO(data)).convert("RGB")
                pixels = proc(images=image, return_tensors="pt")["pixel_values"]
                if n < keep:
                    kept[member.name.split(".")[0]] = pixels[0]
                n += 1
    return n, kept


def lmmkit_loop(pattern: str, n: int, proc, workers: int, batch: int, draft: bool, keep: int = 0
                ) -> tuple[int, dict[str, torch.Tensor]]:
    """lmmkit's streaming pipeline over the same shards: n samples (whole batches), images in workers."""
    from lmmkit.data.mixture import MixtureLoader
    from lmmkit.data.mixture_spec import parse_mixture
    from lmmkit.data.pixels import PixelTransform, collate_pixels, normalise_pixels

    loader = MixtureLoader(parse_mixture(f"wds:{pattern}"), batch_size=batch, num_workers=workers,
                           n_streams=max(1, workers), transform=PixelTransform(proc, draft=draft, normalise=False),
                           collate=collate_pixels, check="none")
    seen, kept = 0, {}
    for blk in loader:
        batch_pixels = normalise_pixels(blk.pixel_values, proc)  # uint8 crops -> the processor's float pixels
        for sample_id, pixels in zip(blk.ids, batch_pixels, strict=True):
            if len(kept) < keep:
                kept[sample_id] = pixels
        seen += len(blk.ids)
        if seen >= n:
            break
    return seen, kept


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 images, one repeat")
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--size", type=int, default=224, help="the CLIP processor's input size (224 or 336)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lmmkit-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.batch = 64, 1, 8
    bc.setup(args.threads)
    shards = write_shards(args.work / f"data-throughput-{args.images}", args.images)
    pattern = str(shards[0].parent / f"{{00000..{len(shards) - 1:05d}}}.tar")
    proc = processor(args.size)
    n = args.images - args.images % args.batch  # whole batches on the lmmkit side; the plain loop reads all
    sides = {
        "plain": lambda keep=0: plain_loop(shards, proc, keep),
        "lmmkit": lambda keep=0: lmmkit_loop(pattern, n, proc, args.workers, args.batch, False, keep),
        "lmmkit 0 workers": lambda keep=0: lmmkit_loop(pattern, n, proc, 0, args.batch, False, keep),
        "lmmkit draft": lambda keep=0: lmmkit_loop(pattern, n, proc, args.workers, args.batch, True, keep),
        "lmmkit draft 0 workers": lambda keep=0: lmmkit_loop(pattern, n, proc, 0, args.batch, True, keep),
    }
    # Pixels checked on the first 32 samples each side reads (by key): exact mode must equal the processor's.
    check = {side: fn(keep=32)[1] for side, fn in sides.items() if side in ("plain", "lmmkit", "lmmkit draft")}
    common = sorted(set(check["plain"]) & set(check["lmmkit"]) & set(check["lmmkit draft"]))
    same = bool(common) and all(torch.equal(check["plain"][k], check["lmmkit"][k]) for k in common)
    diffs = torch.stack([(check["plain"][k] - check["lmmkit draft"][k]).abs() for k in common]) if common else None
    info = bc.machine(args.threads)
    loads, scaling = [bc.load_now()], [two_core_scaling()]
    times: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):
        for side, fn in sides.items():
            before = cpu_seconds()
            seconds, (count, _) = bc.timed(fn)
            cpu[side].append(cpu_seconds() - before)
            times[side].append(seconds)
            counts[side] = count
    loads.append(bc.load_now())
    scaling.append(two_core_scaling())
    rates = {side: counts[side] / bc.median(times[side]) for side in sides}
    cpu_ms = {side: 1000 * bc.median(cpu[side]) / counts[side] for side in sides}  # all processes, per sample
    ratio, draft_ratio = rates["lmmkit"] / rates["plain"], rates["lmmkit draft"] / rates["plain"]
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "times": times, "counts": counts,
               "samples_per_s": rates, "cpu_ms_per_sample": cpu_ms, "cpu_seconds": cpu,
               "cpu_ratio": cpu_ms["plain"] / cpu_ms["lmmkit"], "cpu_ratio_draft": cpu_ms["plain"] / cpu_ms["lmmkit draft"], "ratio": ratio, "ratio_draft": draft_ratio,
               "ratio_0_workers": rates["lmmkit 0 workers"] / rates["plain"],
               "ratio_draft_0_workers": rates["lmmkit draft 0 workers"] / rates["plain"],
               "two_core_scaling": [round(x, 2) for x in scaling], "same_pixels": same,
               "checked": len(common), "load_avg_1m": loads,
               "draft_abs_diff": {"mean": float(diffs.mean()), "max": float(diffs.max())} if diffs is not None else None}
    rows = [(side, f"{rates[side]:7.1f} samples/s  {cpu_ms[side]:5.2f} ms CPU/sample  ({counts[side]} samples, "
                   f"median of {args.repeats})") for side in sides]
    target = "met" if ratio >= 3 else "MISSED"
    rows.append(("ratio lmmkit/plain", f"{ratio:.2f}x with {args.workers} workers (target >= 3x: {target}); "
                                       f"same pixels as the processor: {same} ({len(common)} checked)"))
    rows.append(("CPU per sample plain/lmmkit", f"{results['cpu_ratio']:.2f}x exact, {results['cpu_ratio_draft']:.2f}x "
                                                  f"draft ({args.workers} workers + the main process, all counted)"))
    rows.append(("ratio lmmkit 0 workers/plain", f"{results['ratio_0_workers']:.2f}x (one process: the per-sample "
                                                   "work alone)"))
    if diffs is not None:
        rows.append(("ratio lmmkit draft/plain", f"{draft_ratio:.2f}x with {args.workers} workers, "
                                                 f"{results['ratio_draft_0_workers']:.2f}x in one process; pixel "
                                                 f"difference (normalised units) mean {float(diffs.mean()):.4f}, "
                                                 f"max {float(diffs.max()):.3f}"))
    rows.append(("images", f"{args.images} JPEGs, {len(shards)} shards, CLIP processor {args.size} px, batch {args.batch}"))
    rows.append(("load (1 min avg)", ", ".join(map(str, loads))))
    rows.append(("two-core scaling now", ", ".join(f"{x:.2f}x" for x in scaling) + " (2.0 = two free cores; "
                                         "before and after)"))
    bc.report("data throughput: lmmkit's streaming pipeline vs a plain loop", info, rows, args.json, results)
    return results


if __name__ == "__main__":
    main()
