"""Model-section rules that tie several keys together, checked at config time (before anything loads).

Each problem is returned as (dotted key, message) so `lmmkit.config` can say where the key came from
(the file or the command line). Rules that need the parts themselves (a tower's input size, its token
grid) are checked when the model is built (`lmmkit.models.build`), with the same keys named.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmmkit.models.highres import parse_pinpoints
from lmmkit.models.parts import PARTS_DIR
from lmmkit.specs import SHIPPED_LM, Config, ModelSpec

Problem = tuple[str, str]
MIN_TILE = 8  # no ViT tower takes inputs smaller than this: pinpoints no such size divides fit no tower


def model_problems(m: ModelSpec) -> list[Problem]:
    """Every architecture choice of `m` that cannot go together, one (key, message) per problem."""
    out: list[Problem] = []
    if (m.bridge == "fuyu") != (m.vision == "patch"):
        out.append(("model.bridge", f"model.bridge={m.bridge!r} with model.vision={m.vision!r}: the Fuyu bridge projects "
                    "raw image patches, so model.bridge=fuyu goes with model.vision=patch and only with it"))
    if m.pixel_shuffle > 1 and m.bridge != "mlp":
        out.append(("model.pixel_shuffle", f"model.pixel_shuffle={m.pixel_shuffle} regroups tokens for the MLP bridge, "
                    f"but model.bridge={m.bridge!r}; set model.pixel_shuffle=1 or model.bridge=mlp"))
    if m.vision == "patch":
        if m.vision_extra:
            out.append(("model.vision_extra", "model.vision_extra: the patch embedding (model.vision=patch) cannot be "
                        "fused with another tower; unset model.vision_extra"))
        for side in ("height", "width"):
            size = getattr(m, f"patch_canvas_{side}")
            if size % m.patch_size:
                fits = [p for p in range(1, size + 1) if size % p == 0 and p <= 64]
                out.append((f"model.patch_canvas_{side}", f"model.patch_canvas_{side}={size} is not a multiple of "
                            f"model.patch_size={m.patch_size}; patch sizes that fit: {', '.join(map(str, fits))}"))
    return out + anyres_problems(m)


def anyres_problems(m: ModelSpec) -> list[Problem]:
    """AnyRes keys: a per-token MLP bridge on one ViT tower, and pinpoints that parse.

    Whether each pinpoint is a multiple of the tower's input size needs the tower, so build_vlm checks
    that (naming model.anyres_grid_pinpoints and the pinpoint); here what the text alone can tell."""
    out: list[Problem] = []
    if not m.anyres:
        for key, unset in (("anyres_grid_pinpoints", None), ("anyres_max", 0)):
            if getattr(m, key) != unset:
                out.append((f"model.{key}", f"model.{key} is set but model.anyres is false, so it would be ignored; "
                            f"set model.anyres=true or unset model.{key}"))
        return out
    if m.bridge != "mlp" or m.pixel_shuffle > 1:
        out.append(("model.anyres", f"model.anyres works with model.bridge=mlp and model.pixel_shuffle=1 (LLaVA-NeXT's "
                    f"projector maps each patch feature to one token), not model.bridge={m.bridge!r} with "
                    f"model.pixel_shuffle={m.pixel_shuffle}"))
    if m.vision == "patch" or m.vision_extra:
        which = "model.vision=patch (no encoder)" if m.vision == "patch" else "model.vision_extra (fused towers)"
        out.append(("model.anyres", f"model.anyres tiles images for one ViT tower (CLIP, SigLIP), not {which}; "
                    "set model.anyres=false or use a single CLIP / SigLIP tower"))
    if m.anyres_grid_pinpoints is not None:
        try:
            points = parse_pinpoints(m.anyres_grid_pinpoints)
        except ValueError as err:
            out.append(("model.anyres_grid_pinpoints", f"model.anyres_grid_pinpoints: {err}"))
        else:
            # Every pinpoint must be a whole number of tower tiles, so the tower size divides all their sides.
            common = math.gcd(*(side for point in points for side in point))
            if common < MIN_TILE:
                out.append(("model.anyres_grid_pinpoints", f"model.anyres_grid_pinpoints={m.anyres_grid_pinpoints!r}: "
                            "every pinpoint must be a multiple of the vision tower's input size, but the largest "
                            f"size dividing all these sides is {common}, smaller than any ViT tile; use multiples of "
                            "the tower size, e.g. 336x672,672x336 for a 336-pixel tower"))
    return out


# LLM types whose transformers 5.24 code passes a ready 4D attention mask through unchanged and takes position_ids
# (their masks come from `create_causal_mask`, which returns a 4D mask as given): packed logits equal unpacked
# ones for each, tested in tests/train/test_packing.py. State-space LMs (Mamba) have no attention mask at all.
PACKABLE_LLM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2", "phi3", "gpt2")


def packing_problem(model_type: str) -> str | None:
    """Why an LLM of `model_type` cannot train packed rows, or None when it can."""
    if model_type in PACKABLE_LLM_TYPES:
        return None
    return (f"train.packing needs an LLM that takes position_ids and a 4D (block-diagonal) attention mask, so that "
            f"samples packed in one row cannot attend to each other; a {model_type!r} LLM is not one lmmkit has "
            f"verified. Supported LLM types: {', '.join(PACKABLE_LLM_TYPES)}. Set train.packing=false")


def llm_type(llm: str) -> str | None:
    """The model_type of `model.llm` when its config can be read without loading anything (the shipped LM, a
    local folder), else None (a hub id is checked when the model is built)."""
    folder = PARTS_DIR / "lm" if llm == SHIPPED_LM else Path(llm)
    try:
        return str(json.loads((folder / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError):
        return None


def packing_problems(cfg: Config) -> list[Problem]:
    """train.packing with a stage, bridge or LLM that cannot pack samples into shared rows."""
    if not cfg.train.packing:
        return []
    out: list[Problem] = []
    if cfg.train.stage == "dpo":
        out.append(("train.packing", "train.packing: the dpo stage compares each chosen answer with its rejected one "
                    "row by row, so its pairs are padded, not packed; packing works in stages align, sft and full"))
    if cfg.model.bridge == "cross-attention":
        out.append(("train.packing", "train.packing: with model.bridge=cross-attention the images reach every text "
                    "token of a row through cross-attention, so samples sharing a row would see each other's "
                    "images; set train.packing=false or use another bridge"))
    model_type = llm_type(cfg.model.llm)
    if model_type is not None and (why := packing_problem(model_type)):
        out.append(("model.llm", f"model.llm is a {model_type!r} model: {why}"))
    return out


__all__ = ["PACKABLE_LLM_TYPES", "anyres_problems", "llm_type", "model_problems", "packing_problem",
           "packing_problems"]
