"""The `lmmkit` command: subcommands parse arguments and dispatch, nothing more."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from lmmkit.models.parts import PARTS_DIR, record_part

    out = Path(args.out) if args.out else PARTS_DIR / args.part
    if args.part == "lm":
        from lmmkit.train.pretrain_lm import pretrain_lm

        r = pretrain_lm(out, steps=args.steps or 3000, seed=args.seed)
        scores = {"existence_f1_symbolic_heldout": round(r.existence_f1, 4), "final_loss": round(r.final_loss, 4),
                  "steps": r.steps, "seconds": round(r.seconds, 1)}
    else:
        from lmmkit.train.pretrain_vision import pretrain_vision

        r = pretrain_vision(out, steps=args.steps or 1200, seed=args.seed)
        scores = {"detection_f1_heldout": round(r.detection_f1, 4), "word_accuracy": round(r.word_accuracy, 4),
                  "final_loss": round(r.final_loss, 4), "steps": r.steps, "seconds": round(r.seconds, 1)}
    manifest = record_part(args.part, out, scores)
    print(f"{args.part}: {scores}\nsaved to {out}; manifest {manifest}")
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "shapes":
        from lmmkit.data.shapes.generate import generate_shapes

        ds = generate_shapes(Path(args.out), seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                             n_pope_images=args.n_pope_images, workers=args.workers)
        print(f"ShapesWorld written to {args.out}: {ds}")
        return 0
    from lmmkit.data.check import check_file, format_report
    from lmmkit.data.schema import DataError

    try:
        report = check_file(Path(args.file), Path(args.image_folder) if args.image_folder else None,
                            open_images=not args.no_open_images)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report.n_bad == 0 else 1


def _train(args: argparse.Namespace) -> int:
    from lmmkit.config import ConfigError, load_config
    from lmmkit.train.run import train_from_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error:\n{err}", file=sys.stderr)
        return 2
    result = train_from_config(cfg, resume=args.resume)
    print(f"{result.stage}: {result.steps} steps, final loss {result.final_loss:.4f}, "
          f"{result.tokens_per_second:,.0f} tokens/s; checkpoint {result.checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from lmmkit.eval.generation import lm_loss
    from lmmkit.eval.report import format_table
    from lmmkit.eval.shapes import evaluate_pope
    from lmmkit.train.checkpoint import load_model
    from lmmkit.train.run import load_samples

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"pope", "lmloss"})
    if unknown:
        print(f"error: unknown task(s) {', '.join(unknown)}; available here: pope, lmloss", file=sys.stderr)
        return 2
    model = load_model(args.model)
    root = Path(args.data_root)
    results: dict = {}
    if "pope" in tasks:
        results["pope"] = {"model": evaluate_pope(model, root, limit=args.limit)}
        if args.blind_control:
            results["pope"]["blind control (blank image)"] = evaluate_pope(model, root, blind=True, limit=args.limit)
    if "lmloss" in tasks:
        samples, _ = load_samples(model, root / "test" / "conversations.json", root / "images", 512)
        results["lm_loss"] = lm_loss(model, samples[: args.limit] if args.limit else samples)
    print(format_table(results))
    if "lm_loss" in results:
        print(f"LM loss: {results['lm_loss']['loss']:.4f} (perplexity {results['lm_loss']['perplexity']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from lmmkit.data.images import load_image
    from lmmkit.eval.generation import answer_questions
    from lmmkit.train.checkpoint import load_model

    model = load_model(args.checkpoint)
    image = load_image(Path(args.image), where="--image")
    print(answer_questions(model, [(image, args.prompt)], max_new_tokens=args.max_tokens, progress=False)[0])
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lmmkit.demo import DemoSettings, run_demo

    s = DemoSettings(out=Path(args.out), seed=args.seed, from_scratch=args.from_scratch)
    for name in ("n_train", "align_steps", "sft_steps", "threads"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    run_demo(s)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmmkit", description="Build, train, evaluate and serve LLaVA-family VLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain the tiny ShapesWorld parts (text LM or vision tower)")
    p.add_argument("part", choices=["lm", "vision"])
    p.add_argument("--out", help="output folder (default: the shipped parts folder)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("data", help="make or check data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("shapes", help="generate a ShapesWorld dataset (LLaVA JSON + POPE files)")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n-train", type=int, default=8000)
    q.add_argument("--n-test", type=int, default=600)
    q.add_argument("--n-pope-images", type=int, default=300)
    q.add_argument("--workers", type=int, default=2)
    q = dsub.add_parser("check", help="check a LLaVA JSON / JSONL file and its images without training")
    q.add_argument("file")
    q.add_argument("--image-folder")
    q.add_argument("--no-open-images", action="store_true", help="only check that image files exist")
    p.set_defaults(func=_data)

    p = sub.add_parser("train", help="train one stage from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a ShapesWorld folder (POPE, LM loss)")
    p.add_argument("--model", required=True, help="an lmmkit checkpoint folder")
    p.add_argument("--tasks", default="pope,lmloss")
    p.add_argument("--data-root", required=True)
    p.add_argument("--blind-control", action="store_true", help="also score with every image blanked")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task/split")
    p.add_argument("--json", help="write the scores here")
    p.set_defaults(func=_eval)

    p = sub.add_parser("chat", help="one image + a question -> the model's answer")
    p.add_argument("checkpoint")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=_chat)

    p = sub.add_parser("demo", help="the main job on the built-in default (ShapesWorld, shipped parts)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-scratch", action="store_true", help="pretrain the LM and tower first (~25 min)")
    p.add_argument("--n-train", type=int)
    p.add_argument("--align-steps", type=int)
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
