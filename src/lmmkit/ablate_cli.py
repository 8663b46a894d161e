"""`lmmkit ablate`: parse the arguments, run `lmmkit.ablate.run_ablation`, report errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmmkit.ablate import DEFAULT_DESIGNS, DESIGNS, AblateSettings, AblationError, parse_designs, run_ablation


def _cli(args: argparse.Namespace) -> int:
    try:
        s = AblateSettings(designs=parse_designs(args.bridges), out=Path(args.out),
                           data=Path(args.data) if args.data else None, seed=args.seed, n_train=args.n_train,
                           n_test=args.n_test, n_pope_images=args.n_pope_images, align_steps=args.align_steps,
                           sft_steps=args.steps, batch_size=args.batch_size, align_lr=args.align_lr,
                           sft_lr=args.lr, probes=args.probes, probe_questions=args.probe_questions,
                           llm=args.llm, vision=args.vision, threads=args.threads)
        run_ablation(s)
    except AblationError as err:
        print(f"ablate error: {err}", file=sys.stderr)
        return 2
    return 0


def add_ablate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`lmmkit ablate --bridges mlp,fuyu --steps N ...`."""
    d = AblateSettings()
    p = subparsers.add_parser("ablate", help="train and compare bridge designs on the same ShapesWorld data and budget")
    p.add_argument("--bridges", default=DEFAULT_DESIGNS, help=f"comma-separated designs among: {', '.join(DESIGNS)}")
    p.add_argument("--steps", type=int, default=d.sft_steps, help="SFT optimizer steps (every design)")
    p.add_argument("--align-steps", type=int, default=d.align_steps, help="align optimizer steps (every design)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.sft_lr, help="SFT learning rate (warmup + cosine)")
    p.add_argument("--align-lr", type=float, default=d.align_lr)
    p.add_argument("--n-train", type=int, default=d.n_train, help="training images (captions + conversations)")
    p.add_argument("--n-test", type=int, default=d.n_test, help="held-out images")
    p.add_argument("--n-pope-images", type=int, default=d.n_pope_images, help="held-out images with POPE questions")
    p.add_argument("--probes", type=int, default=d.probes, help="POPE-subset measurements during SFT")
    p.add_argument("--probe-questions", type=int, default=d.probe_questions, help="POPE questions per split per probe")
    p.add_argument("--data", default=None, help="reuse this ShapesWorld folder instead of generating OUT/data")
    p.add_argument("--out", default=str(d.out))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--llm", default=d.llm)
    p.add_argument("--vision", default=d.vision, help="the tower of every design except fuyu (vision: patch)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.set_defaults(func=_cli)
    return p
