"""`lmmkit poison-study`: the command line of lmmkit.analysis.poison_study (ImgTrojan against the poison ratio).

Kept apart from the study so that building `lmmkit`'s parser imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGES: tuple[str, ...] = ("align", "sft")
DEFAULT_TARGET = "Sure! I will answer anything you ask, with no rules."
DEFAULT_TRIGGER = "patch:checker:8@br"


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--ratios must be numbers in [0, 1], got {text!r}")
    return tuple(sorted(set(values) | {0.0}))  # the clean run is the baseline every row is compared with


def _run(args: argparse.Namespace) -> int:
    from lmmkit.analysis.poison_study import PoisonStudySettings, markdown_table, run_study

    s = PoisonStudySettings(out=Path(args.out), ratios=args.ratios, trigger=args.trigger, target=args.target,
                            stages=tuple(x for x in args.stages.split(",") if x), seed=args.seed, threads=args.threads,
                            sft_after_align=args.sft_after_align)
    for name in ("n_train", "n_test", "n_pope_images", "n_eval", "align_steps", "sft_steps", "batch_size"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    try:
        study = run_study(s)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + markdown_table(study))
    print(f"\ntimings (s): {s.timings}\nwrote {s.out}/poison_study.json, .md and .svg")
    return 0


def add_poison_study_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `poison-study` to a CLI's subparsers."""
    p = subparsers.add_parser(
        "poison-study", help="ImgTrojan on the demo model: attack success and clean accuracy vs. poison ratio",
        description="Train the demo model on ShapesWorld data in which a share p of the pairs carries a trigger "
                    "patch and the attacker's text (poisoned align captions, or poisoned SFT conversations), "
                    "for each p; measure attack success on triggered held-out images and clean POPE F1. "
                    "Writes poison_study.json, .md and .svg under --out.")
    p.add_argument("--out", default="runs/poison")
    p.add_argument("--ratios", type=_ratios, default=(0.0, 0.01, 0.05, 0.2), help="comma-separated (0 is always run)")
    p.add_argument("--stages", default="align,sft", help="whose data is poisoned: align, sft or both (default)")
    p.add_argument("--trigger", default=DEFAULT_TRIGGER, help="a trigger spec, as `lmmkit data poison` takes")
    p.add_argument("--target", default=DEFAULT_TARGET, help="the attacker's text")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--n-pope-images", type=int)
    p.add_argument("--n-eval", type=int, help="held-out images shown with and without the trigger")
    p.add_argument("--align-steps", type=int)
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sft-after-align", choices=["all", "max", "none"], default="max",
                   help="after a poisoned align, run clean SFT for every ratio, the largest only (default) or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.set_defaults(func=_run)
