"""`lmmkit data inspect | convert | dedup SOURCE`: streaming sources in the published formats.

SOURCE is a source spec (lmmkit.data.sources): wds:, llava:, sharegpt4v:, m3it:, arxivqa:, arxivcap:, hf:.
Each subcommand sets its own `func`, so `lmmkit data` dispatches to it directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPEC_HELP = ("a source spec KIND:PATH[@ROOT][#KEY=VALUE,...], KIND one of wds, llava, sharegpt4v, m3it, "
             "arxivqa, arxivcap, hf (see docs/data.md)")


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _inspect(args: argparse.Namespace) -> int:
    from lmmkit.data.inspect_data import format_summary, inspect_source
    from lmmkit.data.inspect_html import write_inspect
    from lmmkit.data.schema import DataError

    tokenizer = None if args.tokenizer in ("none", "") else args.tokenizer
    try:
        stats = inspect_source(args.source, limit=args.limit, tokenizer=tokenizer, check=args.check,
                               policy="stop" if args.strict else "skip")
    except (DataError, ValueError) as err:
        return _fail(err)
    print(format_summary(stats))
    if args.out:
        html_path, json_path = write_inspect(stats, Path(args.out))
        print(f"wrote {html_path} and {json_path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from lmmkit.data.convert import convert_source
    from lmmkit.data.schema import DataError

    try:
        report = convert_source(args.source, args.to, Path(args.out), shard_size=args.shard_size,
                                image_folder=Path(args.image_folder) if args.image_folder else None,
                                policy="stop" if args.strict else "skip", check=args.check, limit=args.limit)
    except (DataError, ValueError) as err:
        return _fail(err)
    where = (f"{report.out} (images in {report.image_folder})" if report.target == "llava-json"
             else f"{len(report.shards)} shard(s) in {report.out}")
    print(f"{report.n_records} records written as {report.target} to {where}; {report.counter.summary()}")
    return 0


def _target_for(out: Path, to: str | None) -> str:
    if to:
        return to
    return "llava-json" if out.suffix.lower() in (".json", ".jsonl") else "wds"


def _dedup(args: argparse.Namespace) -> int:
    from lmmkit.atomic import atomic_write
    from lmmkit.data.convert import write_records
    from lmmkit.data.dedup import DedupReport, dedup_records
    from lmmkit.data.schema import DataError
    from lmmkit.data.sources import open_source

    out = Path(args.out)
    policy = "stop" if args.strict else "skip"
    report = DedupReport()
    try:
        records = open_source(args.source, policy=policy, counter=report.counter, check=args.check)
        kept = dedup_records(records, report, near=args.near, threshold=args.threshold, min_chars=args.min_chars,
                             max_chars=args.max_chars, drop=not args.report_only, policy=policy)
        written = write_records(kept, _target_for(out, args.to), out, shard_size=args.shard_size, policy=policy,
                                counter=report.counter)
    except (DataError, ValueError) as err:
        return _fail(err)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".dedup.json")
    atomic_write(report_path, json.dumps(report.as_dict(), indent=1) + "\n")
    print(f"{report.summary()}\n{written.n_records} records written to {out}; report {report_path}")
    return 0


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("source", help=SPEC_HELP)
    q.add_argument("--check", choices=["decode", "header", "none"],
                   help="how hard to check images while reading (default: the spec's, else decode)")
    q.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")


def add_data_scale_parsers(data_subparsers) -> None:
    """Add `inspect`, `convert` and `dedup` to the `lmmkit data` subparsers (each with its own func)."""
    q = data_subparsers.add_parser("inspect", help="measure a data source: counts, images per sample, image "
                                                   "sizes, token lengths, bad records (HTML page with --out)")
    _common(q)
    q.add_argument("--out", help="folder for inspect.html (SVG charts, self-contained) and inspect.json")
    q.add_argument("--limit", type=int, help="at most this many records")
    q.add_argument("--tokenizer", default="shipped:lm",
                   help="tokenizer for token lengths: shipped:lm, an HF folder or hub id, or none")
    q.set_defaults(func=_inspect)

    q = data_subparsers.add_parser("convert", help="write a data source as LLaVA JSON (+ image folder) or "
                                                   "WebDataset shards")
    _common(q)
    q.add_argument("--to", required=True, choices=["llava-json", "wds"])
    q.add_argument("--out", required=True, help="llava-json: a .json/.jsonl file; wds: a folder of shards")
    q.add_argument("--image-folder", help="llava-json: where images go (default: <out stem>_images/ beside it)")
    q.add_argument("--shard-size", type=int, default=1000, help="wds: records per shard")
    q.add_argument("--limit", type=int, help="at most this many records")
    q.set_defaults(func=_convert)

    q = data_subparsers.add_parser("dedup", help="drop exact (and with --near, near) duplicate images and "
                                                 "captions outside a length range; writes a report")
    _common(q)
    q.add_argument("--out", required=True, help="the kept records: a .json/.jsonl file (LLaVA) or a shard folder")
    q.add_argument("--to", choices=["llava-json", "wds"], help="output format (default: from --out's suffix)")
    q.add_argument("--near", action="store_true", help="also find near duplicates (64-bit dHash)")
    q.add_argument("--threshold", type=int, default=4, help="--near: at most this many differing bits (of 64)")
    q.add_argument("--min-chars", type=int, help="drop records whose answer text is shorter")
    q.add_argument("--max-chars", type=int, help="drop records whose answer text is longer")
    q.add_argument("--report-only", action="store_true", help="report duplicates but keep them")
    q.add_argument("--report", help="report JSON (default: <out>.dedup.json)")
    q.add_argument("--shard-size", type=int, default=1000, help="wds output: records per shard")
    q.set_defaults(func=_dedup)
