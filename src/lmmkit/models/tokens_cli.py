"""`lmmkit tokens IMAGE...`: how many visual tokens each image costs under common VLM schemes.

Only image sizes are read (PIL opens the header, no decoding), so this is instant on large folders and
answers "will these images fit my context?" before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SCHEMES = ("gpt4v-low", "gpt4v-high", "anyres", "fixed", "fuyu")
DEFAULT_SETTINGS: dict[str, Any] = {
    "grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],  # LLaVA-1.6, (h, w)
    "encoder_size": 336,  # CLIP ViT-L/14-336
    "patch_size": 14,
    "anyres_max": None,  # LLaVA-OneVision caps with 9 ("anyres_max_9"); LLaVA-1.6 has no cap
    "fuyu_patch_size": 30,
    "fuyu_canvas": [1080, 1920],  # (height, width)
}
DEFAULTS_NOTE = ("defaults: LLaVA-1.6 grid pinpoints, CLIP-336 patch 14, "
                 "Fuyu patch 30 on a 1080x1920 (HxW) canvas")


class TokensError(Exception):
    """A user-facing problem (file, image, config, scheme) with a message that names it."""


def _parse_schemes(text: str | None) -> list[str]:
    if text is None:
        return list(SCHEMES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCHEMES]
    if unknown or not names:
        raise TokensError(f"unknown scheme {', '.join(unknown) or repr(text)}: "
                          f"choose from {', '.join(SCHEMES)} "
                          "(comma-separated, e.g. --scheme anyres,gpt4v-high)")
    return list(dict.fromkeys(names))


def _check_settings(settings: dict[str, Any]) -> None:
    """Run each value through the counting code's own validation, so a bad key fails here, by name."""
    from lmmkit.models import highres

    encoder, patch = settings["encoder_size"], settings["patch_size"]
    checks = [
        (("encoder_size", "patch_size"), lambda: highres.fixed_token_count(encoder, patch)),
        (("grid_pinpoints",), lambda: highres.validate_pinpoints(settings["grid_pinpoints"], encoder)),
        (("anyres_max",), lambda: highres.parse_anyres_max(settings["anyres_max"])),
        (("fuyu_patch_size", "fuyu_canvas"),
         lambda: highres.fuyu_token_count((1, 1), settings["fuyu_patch_size"], settings["fuyu_canvas"])),
    ]
    for keys, check in checks:
        try:
            check()
        except (ValueError, TypeError) as err:
            raise TokensError(f"bad value for {' / '.join(keys)}: {err}") from err


def load_settings(path: str | None) -> dict[str, Any]:
    """Defaults, overridden by the keys of an optional YAML mapping; unknown keys are refused by name."""
    settings = dict(DEFAULT_SETTINGS)
    if path is None:
        return settings
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise TokensError(f"cannot read config {path}: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise TokensError(f"config {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise TokensError(f"config {path} must be a mapping of keys ({', '.join(DEFAULT_SETTINGS)}), "
                          f"got {type(data).__name__}")
    for key in data:
        if key not in DEFAULT_SETTINGS:
            raise TokensError(f"config {path}: unknown key {key!r}; "
                              f"valid keys: {', '.join(DEFAULT_SETTINGS)}")
    settings.update(data)
    try:
        _check_settings(settings)
    except TokensError as err:
        raise TokensError(f"config {path}: {err}") from err
    return settings


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header, without decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.exists():
        raise TokensError(f"no such file: {path}")
    if not file.is_file():
        raise TokensError(f"not a file: {path}")
    try:
        with Image.open(file) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise TokensError(f"cannot read image {path}: {err}") from err


def count_tokens(size_wh: tuple[int, int], scheme: str, settings: dict[str, Any]) -> int:
    """Visual tokens of one image of (width, height) `size_wh` under `scheme`."""
    from lmmkit.models import highres

    hw = (size_wh[1], size_wh[0])
    if scheme == "gpt4v-low":
        return highres.gpt4v_token_count(hw, "low")
    if scheme == "gpt4v-high":
        return highres.gpt4v_token_count(hw, "high")
    if scheme == "anyres":
        return highres.anyres_token_count(hw, settings["grid_pinpoints"], settings["encoder_size"],
                                          settings["patch_size"], anyres_max=settings["anyres_max"])
    if scheme == "fixed":
        return highres.fixed_token_count(settings["encoder_size"], settings["patch_size"])
    if scheme == "fuyu":
        return highres.fuyu_token_count(hw, settings["fuyu_patch_size"], tuple(settings["fuyu_canvas"]))
    raise TokensError(f"unknown scheme {scheme!r}")


def _header(settings: dict[str, Any], config: str | None) -> str:
    pins = ", ".join(f"{h}x{w}" for h, w in settings["grid_pinpoints"])
    cap = f", anyres_max {settings['anyres_max']}" if settings["anyres_max"] is not None else ""
    canvas_h, canvas_w = settings["fuyu_canvas"]
    source = f"settings from {config} (unset keys: defaults)" if config else DEFAULTS_NOTE
    return (f"visual tokens per image; {source}\n"
            f"anyres/fixed: encoder {settings['encoder_size']} px, patch {settings['patch_size']}, "
            f"pinpoints (HxW) {pins}{cap}; fuyu: patch {settings['fuyu_patch_size']}, "
            f"canvas {canvas_h}x{canvas_w} (HxW)")


def _table(rows: list[dict[str, Any]], schemes: list[str], totals: dict[str, int]) -> str:
    header = ["image", "size (WxH)", *schemes]
    body = [[row["path"], f"{row['width']}x{row['height']}", *(str(row["tokens"][s]) for s in schemes)]
            for row in rows]
    body.append([f"total ({len(rows)} image{'s' if len(rows) != 1 else ''})", "",
                 *(str(totals[s]) for s in schemes)])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        left = [cell.ljust(widths[i]) for i, cell in enumerate(line[:2])]
        right = [cell.rjust(widths[i + 2]) for i, cell in enumerate(line[2:])]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body[:-1]), rule, fmt(body[-1])])


def _tokens(args: argparse.Namespace) -> int:
    try:
        schemes = _parse_schemes(args.scheme)
        settings = load_settings(args.config)
    except TokensError as err:
        print(f"tokens error: {err}", file=sys.stderr)
        return 2
    rows, errors = [], []
    for path in args.images:
        try:
            width, height = image_size(path)
        except TokensError as err:
            errors.append(str(err))
            continue
        tokens = {scheme: count_tokens((width, height), scheme, settings) for scheme in schemes}
        rows.append({"path": path, "width": width, "height": height, "tokens": tokens})
    if errors:
        for message in errors:
            print(f"tokens error: {message}", file=sys.stderr)
        return 2
    totals = {scheme: sum(row["tokens"][scheme] for row in rows) for scheme in schemes}
    if args.json:
        print(json.dumps({"settings": settings, "settings_source": args.config or "defaults",
                          "schemes": schemes,
                          "images": rows, "total": totals}, indent=2))
    else:
        print(_header(settings, args.config))
        print(_table(rows, schemes, totals))
    return 0


def add_tokens_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tokens IMAGE... [--scheme S[,S...]] [--config C] [--json]``."""
    p = subparsers.add_parser(
        "tokens", help="count the visual tokens each image costs (AnyRes, LLaVA-1.5, Fuyu, GPT-4V)",
        description="Read each image's size (no decoding) and print how many visual tokens it costs under "
                    "each scheme, with a total: gpt4v-low/gpt4v-high (OpenAI's published tile formula), "
                    "anyres (LLaVA-NeXT grid tiles + unpadding + newlines, optional OneVision anyres_max), "
                    "fixed (LLaVA-1.5: one encoder view) and fuyu (patches + one row-break per row).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--scheme", default=None,
                   help=f"comma-separated subset of {', '.join(SCHEMES)} (default: all)")
    p.add_argument("--config", default=None,
                   help="YAML mapping overriding the defaults; keys: " + ", ".join(DEFAULT_SETTINGS)
                        + " (sizes as [height, width]); anyres_max accepts 9 or 'anyres_max_9'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_tokens)
