"""Memory while streaming: peak RSS after 10k, 100k and 1M text-heavy records read through a two-source mixture.

    nice -n 5 .venv/bin/python benchmarks/data_memory.py            # the figures in docs/data.md (1M records)
    nice -n 5 .venv/bin/python benchmarks/data_memory.py --quick    # a smoke run (seconds)

The data is written by this script: LLaVA conversations without images, three turns each with long answers
(about 1.4 kB of JSON per record), half as JSON lines and half as one JSON list (the reader parses the list
element by element). A `MixtureLoader` (weights 1:1, one stream, in this process) streams `--records`
samples; the process's peak RSS (ru_maxrss) and current RSS are read at each checkpoint (with `--workers N`,
N DataLoader workers do the reading and their peak RSS is read too). Flat means the peak after 1M records is
about the peak after 10k.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

WORDS = ("the a of and to in is with on for that as by this from at are an be it which its or has more than "
         "figure shows image left right top bottom red blue green large small number table chart axis value "
         "increase decrease between across model data result method sample person car tree building street").split()


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(8, 24)))
        out.append(" ".join(words).capitalize() + ".")
    return out


def _record(i: int, rng: np.random.Generator, pool: list[str]) -> dict:
    picks = rng.integers(0, len(pool), size=14)
    answer = " ".join(pool[k] for k in picks[:6])
    turns = [{"from": "human", "value": f"Question {i}: " + pool[picks[6]]}, {"from": "gpt", "value": answer},
             {"from": "human", "value": pool[picks[7]]}, {"from": "gpt", "value": " ".join(pool[k] for k in picks[8:12])},
             {"from": "human", "value": pool[picks[12]]}, {"from": "gpt", "value": pool[picks[13]] * 3}]
    return {"id": f"rec{i:08d}", "conversations": turns}


def write_data(folder: Path, n: int) -> tuple[Path, Path]:
    """n/2 records as JSON lines and n/2 as a JSON list, written once per n."""
    a, b, done = folder / "text-a.jsonl", folder / "text-b.json", folder / "done.json"
    if done.exists() and json.loads(done.read_text()).get("n") == n:
        return a, b
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = _sentences(rng, 4000)
    with a.open("w") as f:
        for i in range(n // 2):
            f.write(json.dumps(_record(i, rng, pool)) + "\n")
    with b.open("w") as f:
        f.write("[")
        for i in range(n // 2, n):
            f.write(("," if i > n // 2 else "") + "\n" + json.dumps(_record(i, rng, pool)))
        f.write("\n]\n")
    done.write_text(json.dumps({"n": n}))
    return a, b


def rss_mib() -> tuple[float, float]:
    """(peak RSS, current RSS) of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return peak, pages * resource.getpagesize() / 2**20


def worker_peaks_mib() -> list[float]:
    """Peak RSS (VmHWM) of each child process (the DataLoader workers), in MiB."""
    peaks = []
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return peaks


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4000 records")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=64, help="samples per block")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (their peak RSS is read too)")
    ap.add_argument("--repeats", type=int, default=1, help="accepted for symmetry with the other scripts")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lmmkit-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.records = 4000
    bc.setup(1)
    from lmmkit.data.mixture import MixtureLoader
    from lmmkit.data.mixture_spec import parse_mixture

    a, b = write_data(args.work / f"data-memory-{args.records}", args.records)
    checkpoints = sorted({c for c in (10_000, 100_000, args.records) if c <= args.records}
                         | ({100, 1000} if args.quick else set()))
    spec = parse_mixture(f"lines=1*llava:{a};list=1*llava:{b}", seed=0)
    loader = MixtureLoader(spec, batch_size=args.batch, num_workers=args.workers, n_streams=max(1, args.workers),
                           check="none")
    before = rss_mib()
    figures, seen, chars, start = [], 0, 0, time.perf_counter()
    pending = list(checkpoints)
    for block in loader:
        for record in block:
            seen += 1
            chars += sum(len(m.content) for m in record.messages)
            if pending and seen == pending[0]:
                peak, now = rss_mib()
                figures.append({"records": seen, "peak_rss_mib": round(peak, 1), "rss_mib": round(now, 1),
                                "seconds": round(time.perf_counter() - start, 1),
                                "worker_peak_rss_mib": [round(w, 1) for w in worker_peaks_mib()]})
                pending.pop(0)
        if not pending:
            break
    info = bc.machine(1)
    sizes = {p.name: p.stat().st_size for p in (a, b)}
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "before": {"peak_rss_mib": round(before[0], 1),
               "rss_mib": round(before[1], 1)}, "checkpoints": figures, "file_bytes": sizes,
               "text_chars": chars, "records_per_s": seen / (time.perf_counter() - start)}
    rows = [("before streaming", f"peak RSS {before[0]:7.1f} MiB, RSS {before[1]:7.1f} MiB")]
    rows += [(f"after {f['records']:>9,} records", f"peak RSS {f['peak_rss_mib']:7.1f} MiB, RSS {f['rss_mib']:7.1f} MiB "
                                                    f"({f['seconds']} s)" + (f"; workers' peak RSS "
                                                    f"{', '.join(map(str, f['worker_peak_rss_mib']))} MiB"
                                                    if f["worker_peak_rss_mib"] else ""))
             for f in figures]
    growth = figures[-1]["peak_rss_mib"] - figures[0]["peak_rss_mib"]
    rows.append(("growth first -> last", f"{growth:+.1f} MiB over {figures[-1]['records'] - figures[0]['records']:,} "
                                         "records"))
    rows.append(("data", f"{sum(sizes.values()) / 2**20:.0f} MiB of JSON ({', '.join(sizes)}), {chars / 2**20:.0f} "
                         f"M characters of text read, {results['records_per_s']:,.0f} records/s"))
    bc.report("memory while streaming text-heavy records through a mixture", info, rows, args.json, results)
    return results


if __name__ == "__main__":
    main()
