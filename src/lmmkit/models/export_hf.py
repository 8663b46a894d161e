"""Export an lmmkit model as a Hugging Face Llava folder: config, safetensors, tokenizer, processor, template.

The folder loads with `AutoModelForImageTextToText` / `AutoProcessor` unchanged, so anything that reads
llava-hf checkpoints (transformers, vLLM, SGLang) can serve it. Only architectures with an exact HF
equivalent are exported; anything else is refused with the reason (see docs/export.md):

- vision: CLIP or SigLIP (ViT towers; `vision_feature_layer` = select_layer, "default" = CLS dropped);
- bridge: the 2-layer Linear-GELU-Linear MLP (= Llava's multi_modal_projector); no resampler / Q-Former
  or pixel shuffle;
- LLM: a causal LM that keeps its decoder under `.model` (Llama, Mistral, Qwen2, ...).

Weights are written in the classic llava-hf key layout (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`): every Llava checkpoint on the Hub uses it,
serving engines map it, and transformers 5 converts it on load.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import GenerationConfig, LlavaConfig, LlavaProcessor

from lmmkit import IMAGE_TOKEN
from lmmkit.models.bridges import MLPBridge, PixelShuffleBridge, ResamplerBridge
from lmmkit.models.vision import VisionTower
from lmmkit.models.vlm import VisionLanguageModel

FORMATS = ("hf-llava", "hf-llava-next")
HF_VISION_TYPES = {"clip_vision_model", "siglip_vision_model"}
GELU_ACTS = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}  # nn.GELU(approximate=...) -> HF ACT2FN name

LLAVA_NEXT_REASON = (
    "cannot export as hf-llava-next: this model has no AnyRes (model.anyres=false), it sees one "
    "base-resolution view per image. HF LlavaNext always adds high-resolution grid tiles and image_newline "
    "tokens (even with a single base-size pinpoint it appends at least one image_newline per image), so its "
    "inputs and logits cannot equal this model's. Export with --format hf-llava instead (vLLM and SGLang serve "
    "that as well), or train with model.anyres=true for a LlavaNext export."
)

# Prepended to lmmkit's (string-content) chat template: HF processors and OpenAI-style servers pass list
# content ([{"type": "image"}, {"type": "text", ...}]); each image entry becomes "<image>\n", the text as is,
# which is exactly the prompt lmmkit trains and evaluates on ("<image>\n{question}").
LIST_TO_STRING_PREFIX = "\n".join([
    "{#- lmmkit: list content -> string content #}",
    "{%- set lmmkit_ns = namespace(msgs=[]) -%}",
    "{%- for m in messages -%}",
    "{%- if m['content'] is string -%}{%- set lmmkit_ns.msgs = lmmkit_ns.msgs + [m] -%}",
    "{%- else -%}{%- set lmmkit_text = namespace(s='') -%}",
    "{%- for item in m['content'] -%}",
    "{%- if item['type'] == 'image' -%}{%- set lmmkit_text.s = lmmkit_text.s + '" + IMAGE_TOKEN + "\\n' -%}",
    "{%- elif item['type'] == 'text' -%}{%- set lmmkit_text.s = lmmkit_text.s + item['text'] -%}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- set lmmkit_ns.msgs = lmmkit_ns.msgs + [dict(m, content=lmmkit_text.s)] -%}",
    "{%- endif -%}{%- endfor -%}",
    "{%- set messages = lmmkit_ns.msgs %}",
])


class ExportError(ValueError):
    """The model has no exact equivalent in the requested HF format; the message says why."""


def llava_mapping(model: VisionLanguageModel) -> dict:
    """The LlavaConfig fields that reproduce `model`, or ExportError naming the part with no equivalent."""
    if getattr(model, "variable_tokens", False):
        raise ExportError("cannot export this architecture as hf-llava: it is an AnyRes model (model.anyres=true), "
                          "which sees grid tiles and image_newline tokens; HF Llava sees one view per image. "
                          "Export with --format hf-llava-next")
    return parts_mapping(model.vision, model.bridge, model.llm)


def parts_mapping(tower: nn.Module, bridge: nn.Module, llm: nn.Module, fmt: str = "hf-llava") -> dict:
    """The Llava(Next)Config fields for a tower, a projector and an LLM, or ExportError naming the part that
    has no equivalent in `fmt` (LlavaNext's tower and projector are Llava's)."""
    if not isinstance(tower, VisionTower):
        raise ExportError(
            f"cannot export this architecture as {fmt}: the vision side is a {type(tower).__name__} "
            "(fused towers or the encoder-free patch embedding); HF Llava has exactly one CLIP / SigLIP tower."
        )
    vtype = tower.model.config.model_type
    if tower.is_conv:
        raise ExportError(
            f"cannot export this architecture as {fmt}: the vision tower is a convolutional {vtype!r} "
            "model (feature maps flattened into tokens). HF Llava, vLLM and SGLang only build ViT towers "
            "(CLIP, SigLIP), so there is no equivalent; this includes lmmkit's shipped demo tower (a ResNet)."
        )
    if vtype not in HF_VISION_TYPES:
        raise ExportError(
            f"cannot export this architecture as {fmt}: vision tower type {vtype!r} is not CLIP or "
            "SigLIP, the only Llava towers vLLM and SGLang build."
        )
    if not isinstance(bridge, MLPBridge):
        raise ExportError(
            f"cannot export this architecture as {fmt}: the bridge is {_bridge_kind(bridge)}. HF Llava's "
            "multi_modal_projector maps each vision token to one LLM token through Linear-GELU-Linear, with no "
            "learned queries and no token regrouping, so only model.bridge=mlp with model.pixel_shuffle=1 "
            "(and model.bridge_layers=2) has an exact equivalent."
        )
    linears = [m for m in bridge.modules() if isinstance(m, nn.Linear)]
    acts = [m for m in bridge.modules() if isinstance(m, nn.GELU)]
    if not isinstance(bridge, MLPBridge) or len(linears) != 2 or len(acts) != 1:
        raise ExportError(
            f"cannot export this architecture as {fmt}: the bridge has {len(linears)} linear layer(s) "
            f"({type(bridge).__name__}); HF Llava's multi_modal_projector is always Linear-GELU-Linear "
            "(LLaVA-1.5), so only model.bridge_layers=2 has an exact equivalent."
        )
    if llm.base_model_prefix != "model":
        raise ExportError(
            f"cannot export this architecture as {fmt}: the LLM ({type(llm).__name__}) keeps its decoder "
            f"under {llm.base_model_prefix!r}, which the Llava layout (language_model.model.*) cannot name; "
            "decoder LLMs laid out as <Arch>ForCausalLM.model (Llama, Mistral, Qwen2, Gemma, ...) export."
        )
    drops_cls = tower.has_cls and tower.drop_cls
    return {
        "vision_feature_layer": tower.select_layer,
        # "default" drops the first token (CLS); SigLIP has none, so it is always "full".
        "vision_feature_select_strategy": "default" if drops_cls else "full",
        "num_additional_image_tokens": 1 if tower.has_cls else 0,
        "projector_hidden_act": GELU_ACTS[acts[0].approximate],
        "tied": llm.get_output_embeddings().weight is llm.get_input_embeddings().weight,
    }


def _bridge_kind(bridge: nn.Module) -> str:
    """The bridge in config words, for the refusal message."""
    if isinstance(bridge, ResamplerBridge):
        name, key = ("a Perceiver resampler", "resampler") if bridge.style == "perceiver" else ("a Q-Former", "qformer")
        return f"{name} with {bridge.num_queries} learned queries (model.bridge={key})"
    if isinstance(bridge, PixelShuffleBridge):
        return f"pixel shuffle by {bridge.factor} before the MLP (model.pixel_shuffle={bridge.factor})"
    return f"a {type(bridge).__name__}, not lmmkit's MLP bridge"


def llava_state_dict(model: VisionLanguageModel, tied: bool) -> dict[str, torch.Tensor]:
    """All weights under classic llava-hf names (a tied lm_head is left out: it is the embedding)."""
    return parts_state_dict(model.vision.model, model.bridge, model.llm, tied)


def parts_state_dict(vision_model: nn.Module, bridge: nn.Module, llm: nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """Tower, 2-layer projector and LLM weights under classic llava-hf names (LlavaNext's too)."""
    state = {}
    for name, tensor in vision_model.state_dict().items():
        name = name if name.startswith("vision_model.") else f"vision_model.{name}"
        state[f"vision_tower.{name}"] = tensor
    first, second = [m for m in bridge.modules() if isinstance(m, nn.Linear)]
    for hf_name, linear in (("linear_1", first), ("linear_2", second)):
        state[f"multi_modal_projector.{hf_name}.weight"] = linear.weight
        state[f"multi_modal_projector.{hf_name}.bias"] = linear.bias
    for name, tensor in llm.state_dict().items():
        if not (tied and name == "lm_head.weight"):
            state[f"language_model.{name}"] = tensor
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str = "5GB") -> None:
    """model.safetensors, or shards + model.safetensors.index.json past max_shard_size, as save_pretrained."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_processor(model: VisionLanguageModel, mapping: dict) -> LlavaProcessor:
    """lmmkit's own image processor and tokenizer, with the list-content chat template in front."""
    tokenizer = copy.deepcopy(model.tokenizer)
    template = LIST_TO_STRING_PREFIX + tokenizer.chat_template
    tokenizer.chat_template = template  # one chat_template.jinja serves tokenizer and processor
    processor = LlavaProcessor(
        image_processor=copy.deepcopy(model.vision.processor), tokenizer=tokenizer,
        patch_size=model.vision.model.config.patch_size, chat_template=template, image_token=IMAGE_TOKEN,
        vision_feature_select_strategy=mapping["vision_feature_select_strategy"],
        num_additional_image_tokens=mapping["num_additional_image_tokens"],
    )
    # The processor expands each <image> from the pixel size; refuse rather than write a folder whose
    # placeholder count disagrees with the features the model produces.
    probe = processor(text=IMAGE_TOKEN, images=[Image.new("RGB", (64, 48))], add_special_tokens=False)
    n = sum(1 for t in probe["input_ids"][0] if t == model.image_token_id)
    if n != model.tokens_per_image or processor.image_token_id != model.image_token_id:
        raise ExportError(f"cannot export as hf-llava: LlavaProcessor expands {IMAGE_TOKEN} to {n} tokens "
                          f"but the model gives {model.tokens_per_image} features per image")
    return processor


def export_llava(model: VisionLanguageModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write `model` as an HF Llava folder at `out` (atomically: a temporary folder renamed into place)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) "
                              "or another --out")
    mapping = llava_mapping(model)
    processor = build_processor(model, mapping)
    tokenizer = processor.tokenizer
    text_config = copy.deepcopy(model.llm.config)
    text_config.tie_word_embeddings = mapping["tied"]
    vision_config = copy.deepcopy(model.vision.model.config)
    for sub in (text_config, vision_config):
        sub._name_or_path = ""  # the local folders the parts came from mean nothing where the export goes
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=model.image_token_id, image_seq_length=model.tokens_per_image,
        projector_hidden_act=mapping["projector_hidden_act"],
        vision_feature_layer=mapping["vision_feature_layer"],
        vision_feature_select_strategy=mapping["vision_feature_select_strategy"],
        multimodal_projector_bias=True, tie_word_embeddings=mapping["tied"], dtype=model.llm.dtype,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    # lmmkit stops generating at the tokenizer's eos and nothing else; the exported model does the same.
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(tmp)
    write_weights(llava_state_dict(model, mapping["tied"]), tmp)
    processor.save_pretrained(tmp)
    # transformers 5 keeps the image processor inside processor_config.json; readers on transformers 4
    # (older vLLM / SGLang images) look for preprocessor_config.json.
    processor.image_processor.save_pretrained(tmp)
    return publish(tmp, out)


def publish(tmp: Path, out: Path) -> Path:
    """Rename a finished `tmp` folder to `out`; an old `out` is moved aside first, so one always exists."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_hf(checkpoint: str | Path, out: str | Path, fmt: str = "hf-llava",
              overwrite: bool = False) -> Path:
    """`lmmkit export`: an lmmkit checkpoint (or run folder) -> an HF folder in format `fmt`."""
    from lmmkit.train.checkpoint import load_model

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "hf-llava-next":
        from lmmkit.models.export_llava_next import export_llava_next

        return export_llava_next(load_model(checkpoint), out, overwrite=overwrite)
    return export_llava(load_model(checkpoint), out, overwrite=overwrite)


@torch.no_grad()
def compare_logits(model: VisionLanguageModel, folder: str | Path, image: Image.Image | None = None,
                   question: str = "What is in the picture?") -> float:
    """Max |logit difference| of `model` vs the exported `folder` in transformers, on one image and prompt.

    Raises ExportError when the exported processor builds different input ids or pixels than lmmkit.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmmkit.eval.generation import prompt_ids

    image = image or Image.effect_noise((40, 48), 64).convert("RGB")  # drawn once: both models see it
    processor = AutoProcessor.from_pretrained(folder)
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=model.llm.dtype).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # As lmmkit's HF backend: the tokenizer adds its BOS only where the template did not write one.
    bos = processor.tokenizer.bos_token
    add_special = not (bos is not None and text.startswith(bos))
    inputs = processor(text=text, images=[image], add_special_tokens=add_special, return_tensors="pt")
    ids = torch.tensor([prompt_ids(model, question, image=image)])
    pixels = model.vision.preprocess([image])
    # LlavaNext batches (images, views, 3, S, S); lmmkit's AnyRes one flat (views, 3, S, S) batch.
    theirs_pixels = inputs["pixel_values"][0] if model.variable_tokens else inputs["pixel_values"]
    if not torch.equal(inputs["input_ids"], ids) or not torch.equal(theirs_pixels, pixels):
        raise ExportError(f"{folder}: the exported processor builds other input ids or pixels than lmmkit")
    sizes = {"image_sizes": [(image.height, image.width)]} if model.variable_tokens else {}
    ours = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, **sizes).logits
    theirs = hf(**inputs).logits
    return (ours.float() - theirs.float()).abs().max().item()


__all__ = ["FORMATS", "LIST_TO_STRING_PREFIX", "ExportError", "compare_logits", "export_hf", "export_llava",
           "llava_mapping", "parts_mapping", "parts_state_dict", "publish", "write_weights"]
