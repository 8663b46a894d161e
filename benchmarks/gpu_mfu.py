"""A LLaVA-1.5-7B-shaped SFT step on one GPU: tokens/s and MFU, lmmkit (packed) against HF Llava (padded).

    python benchmarks/gpu_mfu.py               # on a GPU: every side, each in its own process; the figures
                                               # in docs/performance.md
    python benchmarks/gpu_mfu.py --quick       # tiny shapes on any device: a smoke run (tests run it on CPU)

The model: CLIP ViT-L/14 at 336 px (24 layers, width 1024; features from the penultimate layer, CLS dropped: 576
tokens per image), LLaVA's two-layer GELU MLP, and a Llama-2-7B-shaped LLM (32 layers, width 4096, MLP 11008,
32 heads, vocabulary 32,064), random weights, all in bf16. SFT as LLaVA-1.5 trains it: the tower frozen, the
bridge and the LLM trained, AdamW, gradient clipping at 1.0, `--accum` micro-batches per optimizer step.

The data: a seeded stream of samples, one image each (576 tokens) plus a text of 16 to 1,400 tokens (log-normal,
median 220, about LLaVA-665k's spread); a micro-batch takes samples in order up to `--micro-tokens` real tokens,
so every side trains exactly the same tokens.

Sides (each in a fresh process, so one side's memory never limits the next):
- `lmmkit`: lmmkit's model and packed step: every micro-batch one unpadded row through flash-attention's varlen
  kernel (train/varlen.py), logits only at target positions (train/loop.py's target_loss);
- `lmmkit-mask`: the same with the dense block-diagonal mask (lmmkit's CPU packing path) through sdpa;
- `hf`: transformers' LlavaForConditionalGeneration, the micro-batch padded to its longest sample, sdpa,
  `model(**batch, labels=...)`: what a user writes.

MFU = model FLOPs per second / the GPU's dense bf16 peak (989 TFLOP/s for H100 / H200 SXM; `--peak-tflops` for
others). Model FLOPs, the same count for every side: 6 x LLM parameters x tokens (the input embedding excluded:
it is a lookup; the LM head counted at target positions only, the only ones a loss needs) + 6 x bridge parameters
x image tokens + 2 x tower parameters x tower tokens (forward only: the tower is frozen). Attention's own FLOPs
(causal, per sample) are reported beside it as a second MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SIDES = ("lmmkit", "lmmkit-mask", "hf")
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense bf16, SXM datasheets


class Shape(NamedTuple):
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch: int
    text_min: int
    text_median: int
    text_max: int


LLAVA_7B = Shape(4096, 11008, 32, 32, 32064, 1024, 4096, 24, 16, 336, 14, 16, 220, 1400)
TINY = Shape(64, 128, 2, 4, 1024, 32, 64, 2, 2, 28, 14, 8, 20, 40)


def shipped_tokenizer():
    """The shipped LM's tokenizer: it has `<image>` and a chat template; its ids are all below 32,064."""
    from transformers import AutoTokenizer

    from lmmkit import IMAGE_TOKEN
    from lmmkit.models.parts import part_path

    tokenizer = AutoTokenizer.from_pretrained(part_path("lm"))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise SystemExit(f"the shipped tokenizer lacks {IMAGE_TOKEN}")
    return tokenizer


def image_token_id() -> int:
    from lmmkit import IMAGE_TOKEN

    return shipped_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)


def build_lmmkit(shape: Shape, device: torch.device, attention: str, compile_layers: bool = False):
    """lmmkit's VisionLanguageModel at `shape`, random bf16 weights on `device`, set up for SFT."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from lmmkit.models.bridges import MLPBridge
    from lmmkit.models.vision import VisionTower
    from lmmkit.models.vlm import VisionLanguageModel
    from lmmkit.train.stages import apply_stage
    from lmmkit.train.varlen import use_varlen_attention

    tokenizer = shipped_tokenizer()
    processor = CLIPImageProcessor(size={"shortest_edge": shape.image_size},
                                   crop_size={"height": shape.image_size, "width": shape.image_size})
    with torch.device(device):
        llm = LlamaForCausalLM(llm_config(shape, LlamaConfig))
        tower = VisionTower(CLIPVisionModel(vision_config(shape, CLIPVisionConfig)), processor, select_layer=-2)
        bridge = MLPBridge(shape.vision_hidden, shape.hidden, 2)
        model = VisionLanguageModel(tower, llm, tokenizer, bridge=bridge)
    if attention == "varlen":
        use_varlen_attention(model.llm)
    else:
        model.llm.set_attn_implementation("sdpa")
    apply_stage(model, "sft", verbose=False)
    if compile_layers:
        from lmmkit.train.compiled import compile_decoder_layers

        compile_decoder_layers(model.llm)
    return model


def build_hf(shape: Shape, device: torch.device, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=vision_config(shape, CLIPVisionConfig), text_config=llm_config(shape, LlamaConfig),
                         image_token_index=image_token_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.requires_grad_(False)
    for module in (model.model.multi_modal_projector, model.model.language_model, model.lm_head):
        module.requires_grad_(True)
    model.train()
    return model


def llm_config(shape: Shape, cls):
    return cls(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
               num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
               max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0)


def vision_config(shape: Shape, cls):
    return cls(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
               num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
               image_size=shape.image_size, patch_size=shape.patch, projection_dim=shape.vision_hidden)


def sample_stream(shape: Shape, image_token_id: int, seed: int, count: int) -> list:
    """`count` EncodedSamples: an image's placeholders, then text; labels on the last 60% of the text."""
    from lmmkit.data.dataset import EncodedSample
    from lmmkit.data.templates import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    n_image = (shape.image_size // shape.patch) ** 2
    samples = []
    for i in range(count):
        z = float(torch.randn(1, generator=g))
        n_text = int(min(shape.text_max, max(shape.text_min, round(shape.text_median * math.exp(0.8 * z)))))
        text = torch.randint(10, shape.vocab, (n_text,), generator=g)
        text[text == image_token_id] = image_token_id + 1
        ids = [image_token_id] * n_image + text.tolist()
        answer = n_text * 2 // 5
        labels = [IGNORE_INDEX] * (len(ids) - (n_text - answer)) + ids[len(ids) - (n_text - answer):]
        samples.append(EncodedSample(id=str(i), input_ids=ids, labels=labels))
    return samples


def micro_batches(samples: list, micro_tokens: int) -> list[list]:
    out, current, size = [], [], 0
    for s in samples:
        if current and size + len(s.input_ids) > micro_tokens:
            out.append(current)
            current, size = [], 0
        current.append(s)
        size += len(s.input_ids)
    return out  # the last, partial one is dropped


def hf_batch(samples: list, pad_id: int) -> dict:
    from lmmkit.data.collate import pad_batch

    batch = pad_batch([(s.input_ids, s.labels) for s in samples], pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


def model_flops(shape: Shape, params: dict[str, int], micro: list[list]) -> tuple[float, float]:
    """(model FLOPs, attention FLOPs) of the given micro-batches, as the module docstring counts them."""
    n_image = (shape.image_size // shape.patch) ** 2
    n_tower_tokens = n_image + 1  # with CLS
    tokens = sum(len(s.input_ids) for mb in micro for s in mb)
    targets = sum(sum(1 for t in s.labels[1:] if t >= 0) for mb in micro for s in mb)
    images = sum(len(mb) for mb in micro)
    head = shape.hidden * shape.vocab
    flops = 6 * (params["llm"] - params["embed"] - head) * tokens + 6 * head * targets
    flops += 6 * params["bridge"] * images * n_image + 2 * params["vision"] * images * n_tower_tokens
    seq_sq = sum(len(s.input_ids) ** 2 for mb in micro for s in mb)
    attention = 6 * shape.layers * shape.hidden * seq_sq  # causal: half of 4*s^2*h forward, x3 with backward
    attention += 4 * shape.vision_layers * shape.vision_hidden * n_tower_tokens ** 2 * images  # forward only
    return float(flops), float(attention)


def build_side(side: str, shape: Shape, device: torch.device, image_id: int, compile_layers: bool):
    with bc.quiet():
        if side == "hf":
            return build_hf(shape, device, image_id)
        return build_lmmkit(shape, device, "varlen" if side == "lmmkit" else "sdpa", compile_layers)


def run_side(side: str, shape: Shape, args: argparse.Namespace) -> dict:
    from lmmkit.train.loop import target_loss
    from lmmkit.train.packing import make_packed_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    image_id = image_token_id()
    try:
        model = build_side(side, shape, device, image_id, args.compile)
    finally:
        torch.set_default_dtype(torch.float32)
    if side == "hf":
        vision, bridge, llm = model.model.vision_tower, model.model.multi_modal_projector, model.model.language_model
        embed = model.get_input_embeddings()
        llm_params = sum(p.numel() for p in llm.parameters()) + model.lm_head.weight.numel()
    else:
        vision, bridge, llm = model.vision, model.bridge, model.llm
        embed = llm.get_input_embeddings()
        llm_params = sum(p.numel() for p in llm.parameters())
    params = {"vision": sum(p.numel() for p in vision.parameters()), "bridge": sum(p.numel() for p in bridge.parameters()),
              "llm": llm_params, "embed": embed.weight.numel()}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-5, weight_decay=0.0, fused=device.type == "cuda")
    steps = args.warmup + args.steps
    samples = sample_stream(shape, image_id, args.seed, count=steps * args.accum * 64)
    micro = micro_batches(samples, args.micro_tokens)[:steps * args.accum]
    if len(micro) < steps * args.accum:
        raise SystemExit("not enough samples for the requested steps; lower --micro-tokens or --steps")
    pixels = torch.randn(64, 3, shape.image_size, shape.image_size, dtype=torch.bfloat16, device=device)
    pad_id = 0

    def micro_batch(group: list) -> dict:
        if side == "hf":
            batch = hf_batch(group, pad_id)
        else:
            batch = make_packed_batch(model, group, None, pad_id, args.micro_tokens)
            batch.pop("sample_ids")
            batch.pop("num_tokens")
        batch["pixel_values"] = pixels[:len(group)]
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    positions = 0  # computed positions (padding included): the micro-batches' shapes

    def step(groups: list[list]) -> float:
        nonlocal positions
        total = 0.0
        for group in groups:
            batch = micro_batch(group)
            positions += batch["input_ids"].numel()
            loss = (model(**batch).loss if side == "hf" else target_loss(model, batch)) / len(groups)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, times = [], []
    for k in range(steps):
        if k == args.warmup:
            positions = 0
        groups = micro[k * args.accum:(k + 1) * args.accum]
        sync()
        start = time.perf_counter()
        losses.append(step(groups))
        sync()
        times.append(time.perf_counter() - start)
        print(f"  {side} step {k + 1}/{steps}: {times[-1]:.3f} s, loss {losses[-1]:.3f}", flush=True)
    timed = micro[args.warmup * args.accum:]
    seconds = sum(times[args.warmup:])
    tokens = sum(len(s.input_ids) for mb in timed for s in mb)
    flops, attn_flops = model_flops(shape, params, timed)
    return {"side": side, "attention": model.config._attn_implementation if side == "hf" else
            llm.config._attn_implementation, "tokens_per_s": tokens / seconds, "step_s": seconds / args.steps,
            "tokens_per_step": tokens / args.steps, "positions_per_step": positions / args.steps,
            "model_tflops_per_s": flops / seconds / 1e12, "with_attention_tflops_per_s": (flops + attn_flops) / seconds / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
            "params": params, "losses": losses, "step_times": times}


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def matmul_tflops() -> float | None:
    """What this GPU's bf16 matmul reaches (8192^3, mean of 10 after 3 warm-ups): the practical ceiling."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - start) / 1e12


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps: a smoke run on any device")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of: {', '.join(SIDES)}")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, in this process
    parser.add_argument("--compile", action="store_true", help="torch.compile lmmkit's decoder layers (HF stays eager)")
    parser.add_argument("--micro-tokens", type=int, default=4096, help="real tokens per micro-batch (lmmkit: one row)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.micro_tokens, args.accum, args.steps, args.warmup = min(args.micro_tokens, 256), 2, 2, 1
    shape = TINY if args.quick else LLAVA_7B
    bc.setup(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.side:
        result = run_side(args.side, shape, args)
        if args.json:
            args.json.write_text(json.dumps(result))
        return result
    sides = {}
    wanted = [s for s in args.sides.split(",") if s]
    if unknown := set(wanted) - set(SIDES):
        raise SystemExit(f"--sides: unknown {', '.join(sorted(unknown))}; choose among {', '.join(SIDES)}")
    # A CPU has no varlen kernel: there lmmkit packs with the dense mask only.
    for side in wanted if torch.cuda.is_available() else [s for s in wanted if s != "lmmkit"]:
        out = Path(f"/tmp/gpu_mfu_{os.getpid()}_{side}.json")
        cmd = [sys.executable, __file__, "--side", side, "--json", str(out), "--micro-tokens", str(args.micro_tokens),
               "--accum", str(args.accum), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seed", str(args.seed)] + (["--quick"] if args.quick else []) + (["--compile"] if args.compile else [])
        proc = subprocess.run(cmd, text=True)
        sides[side] = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else \
            {"side": side, "error": f"exit code {proc.returncode}"}
    peak = peak_tflops(args)
    results = {"shape": "tiny" if args.quick else "llava-1.5-7b", "device": torch.cuda.get_device_name()
               if torch.cuda.is_available() else "cpu", "peak_tflops": peak, "matmul_tflops": matmul_tflops(),
               "micro_tokens": args.micro_tokens, "compile": args.compile, "accum": args.accum, "steps": args.steps, "sides": sides,
               **bc.machine(1)}
    print(f"\n{results['device']}: dense bf16 peak {peak or 'unknown'} TFLOP/s; 8192^3 matmul here "
          f"{results['matmul_tflops'] or 0:.0f} TFLOP/s" if results["matmul_tflops"] else "")
    print(f"{'side':<12} {'attention':<14} {'tokens/s':>10} {'step s':>8} {'TFLOP/s':>8} {'MFU':>7} "
          f"{'MFU+attn':>9} {'pos/tok':>8} {'mem GiB':>8}")
    for side, r in sides.items():
        if "error" in r:
            print(f"{side:<12} failed: {r['error']}")
            continue
        mfu = f"{r['model_tflops_per_s'] / peak:.1%}" if peak else "-"
        mfu_attn = f"{r['with_attention_tflops_per_s'] / peak:.1%}" if peak else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        print(f"{side:<12} {r['attention']:<14} {r['tokens_per_s']:>10,.0f} {r['step_s']:>8.3f} "
              f"{r['model_tflops_per_s']:>8.1f} {mfu:>7} {mfu_attn:>9} "
              f"{r['positions_per_step'] / r['tokens_per_step']:>8.2f} {mem:>8}")
    ok = [s for s in sides.values() if "error" not in s]
    hf = sides.get("hf", {})
    for r in ok:
        if r["side"] != "hf" and "tokens_per_s" in hf:
            print(f"ratio {r['side']}/hf tokens/s: {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
