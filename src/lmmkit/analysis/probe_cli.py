"""`lmmkit probe CHECKPOINT --image I --prompt P` and `lmmkit probe-study CHECKPOINT --data DIR`.

The numbers come from lmmkit.analysis.probe (per token) and lmmkit.analysis.probe_study (the
ShapesWorld separation study); this module checks the inputs, prints tables and writes files.
Bad inputs (a missing image, no checkpoint there, no held-out scenes) exit with code 2 and one line
saying what is wrong, before any model is loaded where that can be checked first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmmkit.atomic import atomic_write
from lmmkit.data.schema import DataError


def _threads(n: int) -> None:
    # Probes run one short sequence at a time: on a busy 2-core machine one torch thread measured
    # ~100x faster than two for the shipped model, so the docs pass --threads 1; 0 keeps torch's choice.
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _load(checkpoint: str):
    from lmmkit.train.checkpoint import load_model, resolve_checkpoint

    resolve_checkpoint(checkpoint)  # FileNotFoundError with a clear message before anything is built
    return load_model(checkpoint)


def _probe(args: argparse.Namespace) -> int:
    from lmmkit.analysis.probe import format_table, probe_answer
    from lmmkit.data.images import load_image

    try:
        image = load_image(Path(args.image), where="--image")
        _threads(args.threads)
        model = _load(args.checkpoint)
        result = probe_answer(model, image, args.prompt, max_new_tokens=args.max_tokens)
    except (FileNotFoundError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        data = {"checkpoint": str(args.checkpoint), "image": str(args.image), **result.to_json()}
        print(f"\njson: {atomic_write(args.json, json.dumps(data, indent=2))}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from lmmkit.analysis.probe_plot import roc_svg
    from lmmkit.analysis.probe_study import markdown_table, means_table, run_study

    scenes = Path(args.data) / "test" / "scenes.jsonl"
    if not scenes.is_file():
        print(f"error: {scenes}: no held-out scenes (pass a ShapesWorld data folder from `lmmkit data shapes`)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        _threads(args.threads)
        model = _load(args.checkpoint)
        study = run_study(model, Path(args.data), n_images=args.n_images, max_new_tokens=args.max_tokens,
                          n_boot=args.n_boot, seed=args.seed)
    except (FileNotFoundError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    study = {"checkpoint": str(args.checkpoint), "data": str(args.data), **study,
             "seconds": time.perf_counter() - start}
    out = Path(args.out)
    table, means = markdown_table(study), means_table(study)
    summary = (f"{study['n_images']} held-out images; CHAIR_i {study['chair_i']:.3f}, CHAIR_s {study['chair_s']:.3f}; "
               f"existence yes-rate: present {study['true_yes_rate']:.3f}, hard absent {study['false_yes_rate']:.3f}; "
               f"{study['seconds']:.0f} s")
    md = (f"# Probe study: {study['checkpoint']}\n\n{summary}\n\nAUROC = P(grounded mention scores higher than "
          f"a hallucinated one); bootstrap 95% intervals, images resampled whole.\n\n{table}\n\n{means}\n")
    paths = [atomic_write(out / "probe_study.json", json.dumps(study, indent=2)),
             atomic_write(out / "probe_study.md", md), atomic_write(out / "probe_roc.svg", roc_svg(study))]
    print(f"{summary}\n\n{table}\n\n{means}\n")
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_probe_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``probe`` and ``probe-study`` to a CLI's subparsers."""
    p = subparsers.add_parser(
        "probe", help="per-token hallucination probes: visual dependency and image attention share",
        description="Answer greedily, then teacher-force the answer with the image, a blank image and no "
                    "image: per token the three log-probs, the dependencies log p(image) - log p(blank / "
                    "none) and the share of attention on image tokens (mean over layers and heads).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder, or a run folder (its latest)")
    p.add_argument("--image", required=True, help="the image file")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--max-tokens", type=_positive, default=64, help="most answer tokens (default 64)")
    p.add_argument("--json", metavar="OUT", help="also write every number as JSON")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.set_defaults(func=_probe)

    p = subparsers.add_parser(
        "probe-study", help="ShapesWorld: do the probes separate hallucinated from grounded objects? (AUROC)",
        description="Caption held-out ShapesWorld scenes and ask existence questions; label each object "
                    "mention grounded or hallucinated from the scene truth; AUROC of each probe signal "
                    "with bootstrap 95%% intervals clustered by image. Writes probe_study.json, "
                    "probe_study.md and probe_roc.svg under --out.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder, or a run folder (its latest)")
    p.add_argument("--data", required=True, help="a ShapesWorld data folder (test/scenes.jsonl, images/)")
    p.add_argument("--n-images", type=_positive, default=50, help="held-out scenes to probe (default 50)")
    p.add_argument("--out", default="runs/probe-study", help="output folder (default runs/probe-study)")
    p.add_argument("--max-tokens", type=_positive, default=96, help="most caption tokens (default 96)")
    p.add_argument("--n-boot", type=_positive, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the existence questions and bootstrap")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.set_defaults(func=_study)


def main(argv: list[str] | None = None) -> int:
    """Run the two commands without the main CLI: ``python -m lmmkit.analysis.probe_cli probe ...``."""
    parser = argparse.ArgumentParser(prog="lmmkit")
    add_probe_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
