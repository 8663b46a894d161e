"""Hallucination probes: how much each generated token depends on the image, and how much it looks at it.

For one image + prompt the model answers greedily; then the same answer tokens are teacher-forced
under three contexts, so every score refers to the very same sequence:

* ``logp_image``: log p(token | image, prompt, answer prefix);
* ``logp_blank``: the same with the image replaced by a blank one of its size (the image slots are
  still there, they just show nothing);
* ``logp_none``:  the same with no image at all: the prompt without the ``<image>`` placeholder, so
  the answer sits at earlier positions (see ``answer_positions``).

Visual dependency is ``logp_image - logp_blank`` (and ``- logp_none``): a token the model would have
written just as readily without seeing anything scores about 0. The image attention share is the
share of the attention mass that the query predicting the token puts on image positions, averaged
over layers and heads (the position predicting token i is the one before it: that is where the
decision to write it was made).

Everything runs in float32 without autocast: the dependency of a token whose image and blank are
the same image must come out exactly 0, and the greedy choice must be the teacher-forced argmax.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel

from lmmkit.eval.generation import prompt_ids
from lmmkit.models.cross_attention_vlm import CrossAttentionVLM
from lmmkit.models.vlm import VisionLanguageModel

BLANK_COLOUR = (30, 30, 36)  # the blind control's colour (eval.backends.load.BlindBackend)
SIGNALS: tuple[str, ...] = ("dependency_blank", "dependency_none", "attention_share")


@dataclass(frozen=True)
class ProbeResult:
    """Per generated token: id, text, the three teacher-forced log-probs and the image attention share."""

    prompt: str
    answer: str
    token_ids: list[int]
    tokens: list[str]
    logp_image: list[float]
    logp_blank: list[float]
    logp_none: list[float]
    attention_share: list[float]
    greedy_agrees: list[bool]  # the token is the argmax of the image pass (false only for a near tie)

    @property
    def dependency_blank(self) -> list[float]:
        return [a - b for a, b in zip(self.logp_image, self.logp_blank, strict=True)]

    @property
    def dependency_none(self) -> list[float]:
        return [a - b for a, b in zip(self.logp_image, self.logp_none, strict=True)]

    def signal(self, name: str) -> list[float]:
        """One of SIGNALS, per token."""
        if name not in SIGNALS:
            raise ValueError(f"unknown probe signal {name!r}; choose one of {', '.join(SIGNALS)}")
        return list(getattr(self, name))

    def rows(self) -> list[dict]:
        """One dict per token, the two dependencies included (what the table and JSON show)."""
        return [{"i": i, "id": tid, "token": tok, "logp_image": li, "logp_blank": lb, "logp_none": ln,
                 "dependency_blank": db, "dependency_none": dn, "attention_share": a}
                for i, (tid, tok, li, lb, ln, db, dn, a) in enumerate(zip(
                    self.token_ids, self.tokens, self.logp_image, self.logp_blank, self.logp_none,
                    self.dependency_blank, self.dependency_none, self.attention_share, strict=True))]

    def to_json(self) -> dict:
        return {**asdict(self), "dependency_blank": self.dependency_blank,
                "dependency_none": self.dependency_none, "rows": self.rows()}


def blank_like(image: Image.Image, colour: tuple[int, int, int] = BLANK_COLOUR) -> Image.Image:
    """A blank RGB image of `image`'s size: the same number of visual tokens, showing nothing."""
    return Image.new("RGB", image.size, colour)


def check_spliced(model: VisionLanguageModel) -> None:
    """The probes read image positions in the LLM's sequence: only models that splice images in have them."""
    if isinstance(model, CrossAttentionVLM) or not isinstance(model, VisionLanguageModel):
        raise ValueError(f"{type(model).__name__}: probes need a model that splices image tokens into the "
                         "LLM's input (LLaVA-style); cross-attention models keep the image out of the sequence")


def encode_image(model: VisionLanguageModel, image: Image.Image) -> torch.Tensor:
    """Bridged embeddings (1, tokens_per_image, llm_dim) of one image, float32, no grad.

    One image per call, never batched with another: identical images must give bit-identical
    features, so that a blank that is the image itself gives a dependency of exactly 0."""
    with torch.no_grad():
        return model.encode_images(model.vision.preprocess([image]))


def answer_positions(prompt_len: int, n_answer: int) -> range:
    """Positions whose logits predict the answer tokens: the last prompt position predicts the first.

    Dropping the image shortens the prompt by the image slots (and the newline after the tag), so
    the same answer token sits at a different position in each context: always index from here."""
    if prompt_len < 1:
        raise ValueError("a prompt needs at least one token (the generation prompt)")
    return range(prompt_len - 1, prompt_len - 1 + n_answer)


def answer_logprobs(model: VisionLanguageModel, prompt: Sequence[int], answer: Sequence[int],
                    image_embeds: torch.Tensor | None) -> torch.Tensor:
    """Teacher-forced log-softmax rows (len(answer), vocab): row i is the distribution over answer[i]."""
    if not answer:
        return torch.zeros(0, model.llm.config.vocab_size)
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        logits = model.llm(inputs_embeds=model.embed(ids, image_embeds)).logits[0]
    rows = list(answer_positions(len(prompt), len(answer)))
    return logits[rows].float().log_softmax(-1)


def _configs(llm: PreTrainedModel) -> list:
    """Every distinct config object in the LLM (composite models give sub-modules their own)."""
    seen: dict[int, object] = {}
    for module in llm.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def eager_attention(llm: PreTrainedModel) -> Iterator[None]:
    """Run the LLM with eager attention inside the block: sdpa and flash kernels never materialise the
    attention weights, so a model loaded with them returns none. The previous setting is restored
    even if the forward pass fails, so later generation keeps its fast kernel."""
    configs = _configs(llm)
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, impl in zip(configs, old, strict=True):
            c._attn_implementation = impl


def image_attention_share(model: VisionLanguageModel, prompt: Sequence[int], answer: Sequence[int],
                          image_embeds: torch.Tensor | None) -> torch.Tensor:
    """Per answer token, the attention mass the query predicting it puts on image positions, as a share
    of its whole (softmax) mass, i.e. summed over image keys, then averaged over layers and heads."""
    if not answer:
        return torch.zeros(0)
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad(), eager_attention(model.llm):
        out = model.llm(inputs_embeds=model.embed(ids, image_embeds), output_attentions=True)
    if not out.attentions:
        raise RuntimeError(f"{type(model.llm).__name__} returned no attention weights under eager attention")
    attn = torch.stack([a[0].float() for a in out.attentions])  # (layers, heads, queries, keys)
    is_image = ids[0] == model.image_token_id
    rows = list(answer_positions(len(prompt), len(answer)))
    return attn[:, :, rows][..., is_image].sum(-1).mean(dim=(0, 1))


def greedy_answer(model: VisionLanguageModel, prompt: Sequence[int], image_embeds: torch.Tensor | None,
                  max_new_tokens: int) -> list[int]:
    """The generate path's greedy answer (KV cache, float32), end-of-turn excluded."""
    ids = torch.tensor([list(prompt)])
    return model.generate(ids, torch.ones_like(ids), image_embeds=image_embeds, max_new_tokens=max_new_tokens)[0]


def probe_answer(model: VisionLanguageModel, image: Image.Image, prompt: str, max_new_tokens: int = 64,
                 answer_ids: Sequence[int] | None = None, blank: Image.Image | None = None) -> ProbeResult:
    """Generate a greedy answer (unless `answer_ids` is given) and probe every token of it."""
    check_spliced(model)
    model.eval()
    image = image.convert("RGB")
    embeds = encode_image(model, image)
    blank_embeds = encode_image(model, blank if blank is not None else blank_like(image))
    with_image, without = prompt_ids(model, prompt), prompt_ids(model, prompt, with_image=False)
    answer = list(answer_ids) if answer_ids is not None else greedy_answer(model, with_image, embeds, max_new_tokens)
    target = torch.tensor(answer, dtype=torch.long).unsqueeze(-1)

    def picked(rows: torch.Tensor) -> list[float]:
        return rows.gather(-1, target).squeeze(-1).tolist() if answer else []

    full = answer_logprobs(model, with_image, answer, embeds)
    share = image_attention_share(model, with_image, answer, embeds)
    tok = model.tokenizer
    return ProbeResult(
        prompt=prompt, answer=tok.decode(answer, skip_special_tokens=True),
        token_ids=answer, tokens=[tok.decode([t]) for t in answer],
        logp_image=picked(full), logp_blank=picked(answer_logprobs(model, with_image, answer, blank_embeds)),
        logp_none=picked(answer_logprobs(model, without, answer, None)),
        attention_share=share.tolist(), greedy_agrees=(full.argmax(-1) == target.squeeze(-1)).tolist())


def char_spans(model: VisionLanguageModel, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each token in the decoded answer text: found by decoding growing prefixes, since
    byte-level tokens do not map to characters one by one (a leading space is part of the token)."""
    spans, start = [], 0
    for i in range(len(token_ids)):
        end = len(model.tokenizer.decode(list(token_ids[:i + 1]), skip_special_tokens=True))
        spans.append((start, end))
        start = end
    return spans


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting one half (the Mann-Whitney U / (n_pos n_neg)).

    NaN when either class is empty: a bootstrap resample that drew only one class has no AUROC."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if not len(pos) or not len(neg):
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Midranks: every member of a run of equal scores gets the run's mean rank (1-based).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    run_ranks = first + (counts + 1) / 2
    ranks[order] = np.repeat(run_ranks, counts)
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def roc_curve(positive: Sequence[float], negative: Sequence[float]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) points from the highest threshold down, (0,0) to (1,1)."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if not len(pos) or not len(neg):
        return []
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([pos, neg]))[::-1]:
        points.append((float((neg >= t).mean()), float((pos >= t).mean())))
    return points


def format_table(result: ProbeResult) -> str:
    """The per-token table `lmmkit probe` prints."""
    head = ("i", "token", "logp img", "logp blank", "logp none", "dep blank", "dep none", "attn img")
    lines = [f"prompt: {result.prompt}", f"answer: {result.answer}", "",
             f"{head[0]:>3}  {head[1]:<12}" + "".join(f"{h:>11}" for h in head[2:])]
    for r in result.rows():
        cells = (r["logp_image"], r["logp_blank"], r["logp_none"], r["dependency_blank"], r["dependency_none"])
        lines.append(f"{r['i']:>3}  {r['token']!r:<12}" + "".join(f"{v:>11.3f}" for v in cells)
                     + f"{r['attention_share']:>11.3f}")
    return "\n".join(lines)
