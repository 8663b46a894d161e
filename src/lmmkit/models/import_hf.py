"""Import an HF Llava folder as an lmmkit checkpoint: fine-tune, evaluate and serve it with lmmkit.

The checkpoint folder holds the LLM (`llm/`, an AutoModelForCausalLM folder with the tokenizer) and the
vision tower (`vision/`, with its image processor) as HF subfolders, `bridge.safetensors` (the
multi_modal_projector as lmmkit's 2-layer MLP bridge) and `lmmkit_config.json` naming the two subfolders
by absolute path, so `load_model` rebuilds exactly the HF model. LlavaNext becomes an lmmkit AnyRes model
(`model.anyres`, its grid pinpoints; the bridge holds the projector and `image_newline`), again with the HF
model's logits. With `base_resolution_only` it is imported as the Llava inside it instead: one
base-resolution view, no high-resolution tiles, image_newline dropped (answers then differ from the HF model's).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file, save_model
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    PretrainedConfig,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lmmkit import IMAGE_TOKEN
from lmmkit.config import Config, ModelSpec, config_to_dict
from lmmkit.models.bridges import MLPBridge
from lmmkit.models.export_hf import HF_VISION_TYPES, LIST_TO_STRING_PREFIX, publish, write_weights
from lmmkit.models.highres import format_pinpoints
from lmmkit.train.checkpoint import CONFIG_FILE, STATE_FILE

# Prepended to an HF processor's (list-content) chat template, so lmmkit's string prompts
# ("<image>\n{question}") render as [{"type": "image"}, {"type": "text", "text": question}] do.
STRING_TO_LIST_PREFIX = "\n".join([
    "{#- lmmkit: string content -> list content #}",
    "{%- set lmmkit_ns = namespace(msgs=[]) -%}",
    "{%- for m in messages -%}",
    "{%- if m['content'] is string -%}{%- set lmmkit_items = namespace(items=[]) -%}",
    "{%- for part in m['content'].replace('" + IMAGE_TOKEN + "\\n', '" + IMAGE_TOKEN + "')"
    ".split('" + IMAGE_TOKEN + "') -%}",
    "{%- if not loop.first -%}{%- set lmmkit_items.items = lmmkit_items.items + [{'type': 'image'}] -%}",
    "{%- endif -%}",
    "{%- if part -%}{%- set lmmkit_items.items = lmmkit_items.items + [{'type': 'text', 'text': part}] -%}"
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- set lmmkit_ns.msgs = lmmkit_ns.msgs + [dict(m, content=lmmkit_items.items)] -%}",
    "{%- else -%}{%- set lmmkit_ns.msgs = lmmkit_ns.msgs + [m] -%}{%- endif -%}",
    "{%- endfor -%}",
    "{%- set messages = lmmkit_ns.msgs %}",
])


class HFImportError(ValueError):
    """The HF folder has no exact lmmkit equivalent; the message says why."""


def check_importable(config: PretrainedConfig, base_resolution_only: bool = False) -> None:
    """Raise HFImportError naming every part of an HF Llava / LlavaNext config lmmkit cannot reproduce."""
    where = f"{config.model_type} folder"
    if config.model_type not in ("llava", "llava_next"):
        raise HFImportError(f"cannot import model_type {config.model_type!r}: "
                            "only llava and llava_next folders")
    vtype = config.vision_config.model_type
    problems = []
    if vtype not in HF_VISION_TYPES:
        problems.append(f"vision tower {vtype!r} (lmmkit's Llava towers are CLIP and SigLIP)")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer {config.vision_feature_layer} (several layers concatenated; "
                        "lmmkit takes one layer)")
    if config.vision_feature_select_strategy == "default" and vtype == "siglip_vision_model":
        problems.append("the 'default' strategy on SigLIP drops a patch token (SigLIP has no CLS); "
                        "lmmkit never does")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        problems.append(f"projector act {config.projector_hidden_act!r} / bias "
                        f"{config.multimodal_projector_bias} (lmmkit's bridge is Linear-GELU-Linear, exact "
                        "GELU, with biases)")
    if config.model_type == "llava_next" and not base_resolution_only:
        has_cls = vtype == "clip_vision_model"
        if has_cls and config.vision_feature_select_strategy != "default":
            problems.append("the 'full' strategy keeps CLIP's CLS token, so the tile features are not a patch grid "
                            "(LlavaNext itself cannot pack them); pass --base-resolution-only")
    lm_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config.text_config), None)
    if lm_class is None or lm_class.base_model_prefix != "model":
        problems.append(f"text model {config.text_config.model_type!r} "
                        "(no AutoModelForCausalLM laid out as .model)")
    if problems:
        raise HFImportError(f"cannot import this {where} as an lmmkit model: " + "; ".join(problems))


def lmmkit_chat_template(processor: ProcessorMixin) -> str:
    """A template that renders lmmkit's string prompts as the HF processor renders its list content.

    lmmkit tokenizes prompts with add_special_tokens=False (templates write their own BOS). A tokenizer
    that adds BOS itself (Llama's, as in llava-1.5) under a template that does not write it would lose
    the BOS the model was trained with, so the template then writes it.
    """
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    if template is None:
        raise HFImportError("the HF folder has no chat template (processor or tokenizer); lmmkit needs one")
    if template.startswith(LIST_TO_STRING_PREFIX):  # an lmmkit export: its own template is underneath
        template = template[len(LIST_TO_STRING_PREFIX):]
    else:
        template = STRING_TO_LIST_PREFIX + template
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    if adds_bos and not rendered.startswith(bos):
        template = "{{- bos_token }}" + template
    return template


def _image_processor(processor, model_type: str):
    if model_type == "llava":
        return processor.image_processor
    # LlavaNext's base view (its first tile) is the whole image squashed to the tile size, then normalised.
    ip = processor.image_processor
    side = ip.crop_size["height"]
    return CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                 resample=ip.resample, image_mean=ip.image_mean, image_std=ip.image_std,
                                 rescale_factor=ip.rescale_factor, do_rescale=ip.do_rescale,
                                 do_normalize=ip.do_normalize)


def _check_next_processor(ip, config: PretrainedConfig) -> None:
    """LlavaNext settings lmmkit's AnyRes reproduces: square tiles of the tower's size and the model's pinpoints."""
    side = config.vision_config.image_size
    size = ip.size.get("shortest_edge") or (ip.size["height"] if ip.size.get("height") == ip.size.get("width")
                                            else None)
    crop = ip.crop_size["height"] if ip.crop_size and ip.crop_size.get("height") == ip.crop_size.get("width") else size
    problems = []
    if size != side or crop != side:
        problems.append(f"the image processor resizes to {ip.size} and crops to {ip.crop_size}, but the tiles and "
                        f"the base view must be the tower's {side}x{side}")
    if [list(p) for p in ip.image_grid_pinpoints] != [list(p) for p in config.image_grid_pinpoints]:
        problems.append(f"the image processor's grid pinpoints {ip.image_grid_pinpoints} differ from the model "
                        f"config's {config.image_grid_pinpoints}")
    if not getattr(ip, "do_pad", True):
        problems.append("do_pad is false (lmmkit's tiles are always padded to the pinpoint)")
    if problems:
        raise HFImportError("cannot import this llava_next folder as an lmmkit AnyRes model: " + "; ".join(problems)
                            + "; or pass --base-resolution-only")


def import_hf(folder: str | Path, out: str | Path, base_resolution_only: bool = False,
              overwrite: bool = False) -> Path:
    """`lmmkit import`: an HF Llava or LlavaNext (AnyRes; lossily one view with base_resolution_only) folder ->
    an lmmkit checkpoint at `out`."""
    folder, out = Path(folder), Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) "
                              "or another --out")
    config = AutoConfig.from_pretrained(folder)
    check_importable(config, base_resolution_only)
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = copy.deepcopy(processor.tokenizer)
    image_token = getattr(processor, "image_token", IMAGE_TOKEN)
    if image_token != IMAGE_TOKEN or tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_index:
        raise HFImportError(f"the image token is {image_token!r} (id {config.image_token_index}); "
                            f"lmmkit needs {IMAGE_TOKEN!r} with the id the model config names")
    tokenizer.chat_template = lmmkit_chat_template(processor)
    anyres = config.model_type == "llava_next" and not base_resolution_only
    if anyres:
        _check_next_processor(processor.image_processor, config)
    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "llm").mkdir(parents=True)
    # Vision tower: a plain HF vision folder with the image processor lmmkit's VisionTower reads.
    hf.model.vision_tower.save_pretrained(tmp / "vision")
    _image_processor(processor, config.model_type).save_pretrained(tmp / "vision")
    # LLM: the Llava weights written as <Arch>ForCausalLM (model.* + lm_head), with the tokenizer.
    text_config = copy.deepcopy(config.text_config)
    embed, head = hf.model.language_model.get_input_embeddings().weight, hf.lm_head.weight
    text_config.tie_word_embeddings = head.data_ptr() == embed.data_ptr()
    text_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)].__name__]
    text_config.dtype, text_config._name_or_path = embed.dtype, ""  # as written below; no stale local path
    text_config.save_pretrained(tmp / "llm")
    state = {f"model.{k}": v.contiguous() for k, v in hf.model.language_model.state_dict().items()}
    if not text_config.tie_word_embeddings:
        state["lm_head.weight"] = head.detach().contiguous()
    write_weights(state, tmp / "llm")
    tokenizer.save_pretrained(tmp / "llm")
    tokenizer.save_pretrained(tmp / "tokenizer")  # as save_checkpoint writes it
    # Bridge: the projector as lmmkit's MLP bridge (Linear-GELU-Linear).
    proj = hf.model.multi_modal_projector
    bridge = MLPBridge(proj.linear_1.in_features, proj.linear_1.out_features, layers=2)
    bridge.to(proj.linear_1.weight.dtype)
    bridge.net[0].load_state_dict(proj.linear_1.state_dict())
    bridge.net[2].load_state_dict(proj.linear_2.state_dict())
    if anyres:  # AnyResBridge's layout: the projector under "inner", the newline beside it
        state = {f"inner.{k}": v.contiguous() for k, v in bridge.state_dict().items()}
        state["image_newline"] = hf.model.image_newline.detach().contiguous()
        save_file(state, str(tmp / "bridge.safetensors"), metadata={"format": "pt"})
    else:
        save_model(bridge, str(tmp / "bridge.safetensors"))

    # Absolute paths: load_model resolves model.llm / model.vision against the working directory.
    spec = ModelSpec(llm=str(out / "llm"), vision=str(out / "vision"),
                     vision_select_layer=config.vision_feature_layer,
                     vision_drop_cls=config.vision_feature_select_strategy == "default", bridge_layers=2,
                     anyres=anyres,
                     anyres_grid_pinpoints=format_pinpoints(config.image_grid_pinpoints) if anyres else None)
    (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(Config(model=spec)), indent=2))
    trainer_state = {"step": 0, "parts": ["bridge"], "imported_from": str(folder.resolve()),
                     "imported_type": config.model_type}
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    return publish(tmp, out)


__all__ = ["HFImportError", "STRING_TO_LIST_PREFIX", "check_importable", "import_hf", "lmmkit_chat_template"]
