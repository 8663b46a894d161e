"""`lmmkit export` (checkpoint -> HF Llava folder) and `lmmkit import` (HF Llava folder -> checkpoint)."""

from __future__ import annotations

import argparse
import sys

EXPORT_FORMATS = ("hf-llava", "hf-llava-next")  # = export_hf.FORMATS; kept here so --help loads no torch


def _export(args: argparse.Namespace) -> int:
    from lmmkit.models.export_hf import ExportError, compare_logits, export_hf

    try:
        out = export_hf(args.checkpoint, args.out, fmt=args.format, overwrite=args.overwrite)
    except (ExportError, FileExistsError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}): loads with AutoModelForImageTextToText / AutoProcessor; "
          f"serve with `vllm serve {out}`")
    if args.verify:
        from lmmkit.train.checkpoint import load_model

        diff = compare_logits(load_model(args.checkpoint), out)
        print(f"verify: same input ids and pixels; max |logit difference| vs lmmkit = {diff:.3g}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from lmmkit.models.import_hf import HFImportError, import_hf

    try:
        out = import_hf(args.folder, args.out, base_resolution_only=args.base_resolution_only,
                        overwrite=args.overwrite)
    except (HFImportError, FileExistsError) as err:
        print(f"import error: {err}", file=sys.stderr)
        return 2
    print(f"wrote lmmkit checkpoint {out}: use it as train.init_from (with model.llm={out / 'llm'}, "
          f"model.vision={out / 'vision'}), `lmmkit eval --model {out}` or `lmmkit chat {out}`")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export CHECKPOINT --format hf-llava|hf-llava-next --out DIR [--overwrite] [--verify]``."""
    p = subparsers.add_parser(
        "export", help="write an lmmkit checkpoint as an HF Llava / LlavaNext folder (transformers, vLLM, SGLang)",
        description="Write a folder that transformers loads with AutoModelForImageTextToText / AutoProcessor "
                    "(config, safetensors, tokenizer with <image>, processor, chat template). hf-llava-next "
                    "takes AnyRes models (model.anyres=true), hf-llava the others. Architectures with no exact "
                    "HF equivalent (conv towers, a 1-layer bridge, ...) are refused with the reason; see "
                    "docs/export.md.")
    p.add_argument("checkpoint", help="an lmmkit checkpoint folder (or a run folder: its latest checkpoint)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="hf-llava")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--verify", action="store_true",
                   help="reload the export in transformers and print the max logit difference vs lmmkit")
    p.set_defaults(func=_export)


def add_import_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``import HF_FOLDER --out DIR [--base-resolution-only] [--overwrite]``."""
    p = subparsers.add_parser(
        "import", help="turn an HF Llava folder into an lmmkit checkpoint (to fine-tune, evaluate, serve)",
        description="Write an lmmkit checkpoint (llm/ and vision/ HF subfolders, bridge.safetensors, "
                    "lmmkit_config.json) whose logits equal the HF Llava model's; a LlavaNext folder becomes "
                    "an AnyRes model (model.anyres=true).")
    p.add_argument("folder", help="a local HF Llava or LlavaNext folder")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--base-resolution-only", action="store_true",
                   help="LlavaNext: import only the Llava inside it (no AnyRes tiles, image_newline dropped; "
                        "answers then differ from the HF model's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import)
