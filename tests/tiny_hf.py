"""Builders for tiny Hugging Face checkpoints saved on disk (no hub), shared by the model and train tests.

Loaded by path from tests/models/conftest.py and tests/train/conftest.py (see `load()` there), so
it works whichever test folder runs first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lmmkit import IMAGE_TOKEN
from lmmkit.models.tokenizer import CHAT_TEMPLATE

IMAGE_SIZE = 32
PATCH = 8
PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16 patch tokens per image

# Text for the plain tokenizer. It never contains "<image>", so BPE cannot learn it as a merge either.
PLAIN_CORPUS = [
    "What is in the picture? A cat sitting on a red mat.",
    "Describe the image briefly. Two dogs play in the park with a ball.",
    "How many people are there? There are three people near the tree.",
    "What colour is the square? The square is red. The circle is blue.",
]


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2,
                    heads: int = 2) -> Path:
    """A randomly initialised LlamaForCausalLM sized to `tokenizer`, saved with it in `folder`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        initializer_range=0.05, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_gpt2(folder: Path, tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A GPT-2 (learned absolute positions, unlike Llama's relative RoPE), saved with `tokenizer`."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=hidden, n_layer=layers, n_head=2,
                        initializer_range=0.05, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_clip(folder: Path, seed: int = 1) -> Path:
    """A CLIPVisionModel (32 px, patch 8: 16 patches + CLS) and its PIL image processor."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return Path(folder)


def save_tiny_siglip(folder: Path, seed: int = 2) -> Path:
    """A SiglipVisionModel (32 px, patch 8: 16 patches, no CLS) and its PIL image processor."""
    torch.manual_seed(seed)
    config = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    SiglipVisionModel(config).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return Path(folder)


def plain_tokenizer(chat_template: str | None = CHAT_TEMPLATE, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE like train_tokenizer's, but without `<image>` and without a pad token."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(PLAIN_CORPUS * 10, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  additional_special_tokens=["<|endoftext|>", "<|im_start|>"])
    tok.chat_template = chat_template
    return tok


# Tiny HF image-text-to-text models (Llava, LlavaNext) with processors and a list-content chat template.

LIST_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _configs(tokenizer, seed: int) -> tuple[CLIPVisionConfig, LlamaConfig]:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    # Wide init so logits are peaked: greedy ties (which could flip between batched/single) are unlikely.
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    return vision, text


def save_tiny_llava(folder: Path, tokenizer, seed: int = 0) -> Path:
    """LlavaForConditionalGeneration (CLIP 32px/patch 8, Llama 32 wide) + LlavaProcessor, in `folder`.

    "default" feature selection drops CLS: 16 image tokens, which the processor reproduces from
    patch_size=8 and num_additional_image_tokens=1 (CLS) minus the dropped one.
    """
    vision, text = _configs(tokenizer, seed)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LIST_CHAT_TEMPLATE).save_pretrained(folder)
    return Path(folder)


def save_tiny_llava_next(folder: Path, tokenizer, seed: int = 0) -> Path:
    """LlavaNextForConditionalGeneration with anyres grids of 32px tiles + LlavaNextProcessor, in `folder`."""
    vision, text = _configs(tokenizer, seed)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    size = IMAGE_SIZE
    pinpoints = [[size, size], [size, 2 * size], [2 * size, size]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             image_grid_pinpoints=pinpoints)
    LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size},
                                                 image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=LIST_CHAT_TEMPLATE).save_pretrained(folder)
    return Path(folder)


BUILDERS = {"llava": save_tiny_llava, "llava_next": save_tiny_llava_next}
