"""`lmmkit data inspect | convert | dedup SOURCE`, `mix MIXTURE`, `fuse-captions INPUT`: data at scale.

SOURCE is a source spec (lmmkit.data.sources): wds:, llava:, sharegpt4v:, m3it:, arxivqa:, arxivcap:, hf:.
MIXTURE is a mixture file or an inline mixture (lmmkit.data.mixture_spec).
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
    from lmmkit.data.language import LanguageFilter
    from lmmkit.data.schema import DataError
    from lmmkit.data.sources import open_source

    out = Path(args.out)
    policy = "stop" if args.strict else "skip"
    report = DedupReport()
    try:
        languages = LanguageFilter(args.lang.split(","), args.min_lang_prob) if args.lang else None
        records = open_source(args.source, policy=policy, counter=report.counter, check=args.check)
        kept = dedup_records(records, report, near=args.near, threshold=args.threshold, min_chars=args.min_chars,
                             max_chars=args.max_chars, languages=languages, drop=not args.report_only, policy=policy)
        written = write_records(kept, _target_for(out, args.to), out, shard_size=args.shard_size, policy=policy,
                                counter=report.counter)
    except (DataError, ValueError, ImportError) as err:
        return _fail(err)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".dedup.json")
    atomic_write(report_path, json.dumps(report.as_dict(), indent=1) + "\n")
    print(f"{report.summary()}\n{written.n_records} records written to {out}; report {report_path}")
    return 0


def _mix(args: argparse.Namespace) -> int:
    from collections import Counter

    from lmmkit.atomic import atomic_write
    from lmmkit.data.check import BadRecordCounter
    from lmmkit.data.convert import write_records
    from lmmkit.data.mixture import MixtureLoader, choose, cumulative_weights
    from lmmkit.data.mixture_spec import parse_mixture
    from lmmkit.data.schema import DataError

    state_path = Path(args.state) if args.state else None
    try:
        spec = parse_mixture(args.mixture, seed=args.seed)
        state = json.loads(state_path.read_text()) if state_path and state_path.exists() else None
        loader = MixtureLoader(spec, num_workers=args.workers, n_streams=max(1, args.workers), check=args.check,
                               policy="stop" if args.strict else "skip", state=state)
        first = loader.blocks
        records = (r for _, r in zip(range(args.take), loader.samples(), strict=False))
        if args.out:
            out = Path(args.out)
            written = write_records(records, _target_for(out, args.to), out, shard_size=args.shard_size,
                                    policy="stop" if args.strict else "skip", counter=BadRecordCounter())
            where = f"; {written.n_records} written to {out}"
        else:
            for n, record in enumerate(records):
                if n < args.show:
                    print(f"  {first + n:>8}  {record.where}")
            where = ""
    except (DataError, ValueError) as err:
        return _fail(err)
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    cumulative = cumulative_weights(spec)
    counts = Counter(choose(spec.seed, i, cumulative) for i in range(first, loader.blocks))
    n = loader.blocks - first
    for k, (s, p) in enumerate(zip(spec.sources, spec.probabilities, strict=True)):
        print(f"  {s.name:<20} {counts[k]:>9} samples ({counts[k] / max(n, 1):6.1%}; weight {p:6.1%})  {s.source}")
    bad = loader.bad_records()
    print(f"samples {first}..{loader.blocks - 1} of mixture (seed {spec.seed}){where}; "
          + (f"bad records so far: {bad}" if bad else "no bad records"))
    if state_path:
        atomic_write(state_path, json.dumps(loader.state_dict(), indent=1) + "\n")
        print(f"state saved to {state_path}: the next run with --state continues at sample {loader.blocks}")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from lmmkit.data.check import BadRecordCounter
    from lmmkit.data.fuse_captions import CAPSFUSION_PROMPT, check_prompt, fuse_captions, iter_caption_pairs
    from lmmkit.data.schema import DataError
    from lmmkit.eval.backends.load import load_backend
    from lmmkit.eval.cache import ResponseCache
    from lmmkit.eval.judge import BackendJudge

    out = Path(args.out)
    counter = BadRecordCounter()
    policy = "stop" if args.strict else "skip"
    try:
        prompt = check_prompt(Path(args.prompt_file).read_text(encoding="utf-8")) if args.prompt_file \
            else CAPSFUSION_PROMPT
        backend = load_backend(args.llm, text_only=True, api_key_env=args.api_key_env)
        concurrency = args.concurrency or getattr(backend, "concurrency", 1)
        cache = ResponseCache(Path(args.cache) if args.cache else out.with_name(out.name + ".cache.sqlite"))
        llm = BackendJudge(backend, cache, concurrency=concurrency)
        pairs = iter_caption_pairs(args.input, args.raw_field, args.synthetic_field, args.id_field, policy, counter)

        def progress(report) -> None:
            done = report.fused + report.failed
            if done % args.progress_every == 0:
                print(f"  {report.resumed_after + done} rows written", file=sys.stderr, flush=True)

        report = fuse_captions(pairs, out, llm, prompt=prompt, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens, concurrency=concurrency,
                               on_llm_error=args.on_llm_error, limit=args.limit, counter=counter, progress=progress)
    except (DataError, ValueError, OSError) as err:
        return _fail(err)
    print(f"{report.summary()}; {llm.calls} LLM calls, {cache.hits} answers from the cache")
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
    q.add_argument("--lang", help="keep only answers in these languages (ISO 639-1 codes, comma-separated: en,de); "
                                  "detected with langid")
    q.add_argument("--min-lang-prob", type=float, default=0.5,
                   help="--lang: below this probability the language counts as undetermined (dropped)")
    q.add_argument("--report-only", action="store_true", help="report duplicates but keep them")
    q.add_argument("--report", help="report JSON (default: <out>.dedup.json)")
    q.add_argument("--shard-size", type=int, default=1000, help="wds output: records per shard")
    q.set_defaults(func=_dedup)

    q = data_subparsers.add_parser("mix", help="stream a weighted mixture of sources (deterministic by seed, "
                                               "resumable): counts per source, or write the samples out")
    q.add_argument("mixture", help="a mixture file (.yaml/.json: sources with weights) or inline "
                                   "'[NAME=]WEIGHT*SPEC;...' (see docs/data.md)")
    q.add_argument("--seed", type=int, default=0, help="orders the draws (the same seed gives the same samples)")
    q.add_argument("--take", type=int, default=1000, help="how many samples")
    q.add_argument("--out", help="write the samples: a .json/.jsonl file (LLaVA) or a shard folder")
    q.add_argument("--to", choices=["llava-json", "wds"], help="output format (default: from --out's suffix)")
    q.add_argument("--shard-size", type=int, default=1000, help="wds output: records per shard")
    q.add_argument("--state", help="a JSON file: resume from it if it exists, save the position to it at the end")
    q.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: in this process); "
                                                          "a saved state needs the same number")
    q.add_argument("--show", type=int, default=10, help="without --out: print where the first N samples come from")
    q.add_argument("--check", choices=["decode", "header", "none"],
                   help="how hard to check images while reading (default: each spec's, else decode)")
    q.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    q.set_defaults(func=_mix)

    q = data_subparsers.add_parser("fuse-captions", help="CapsFusion: an LLM merges each raw alt-text with a "
                                                         "synthetic caption (cached, resumable JSON lines)")
    q.add_argument("input", help="JSON lines / JSON with the two captions per item, or wds:SHARDS")
    q.add_argument("--llm", required=True, help="openai:<base URL>#<model> (any OpenAI-compatible endpoint) or a "
                                                "local HF causal-LM folder")
    q.add_argument("--out", required=True, help="output .jsonl; rerunning the same command resumes it")
    q.add_argument("--raw-field", default="raw", help="the alt-text field (wds: default KEY.txt)")
    q.add_argument("--synthetic-field", default="synthetic", help="the synthetic caption field")
    q.add_argument("--id-field", default="id", help="JSON input: the item id field (default: the line number)")
    q.add_argument("--prompt-file", help="a prompt with {raw} and {synthetic} (default: CapsFusion's)")
    q.add_argument("--cache", help="SQLite answer cache (default: <out>.cache.sqlite)")
    q.add_argument("--max-new-tokens", type=int, default=128)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--concurrency", type=int, help="requests in flight (default: the backend's: 8 for endpoints)")
    q.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    q.add_argument("--on-llm-error", choices=["stop", "record"], default="stop",
                   help="stop (default: rerun resumes at that item) or record the row with fused = null")
    q.add_argument("--limit", type=int, help="at most this many new items this run")
    q.add_argument("--progress-every", type=int, default=1000, help="print progress every N rows")
    q.add_argument("--strict", action="store_true", help="stop at the first item without both captions")
    q.set_defaults(func=_fuse)
