"""A fast path for images that already have the tower's input size: the same pixels, without the per-image work.

Why: AnyRes tiles and the base view are cut to exactly the tower's square input size, and ShapesWorld
images are drawn at it, so an HF processor's resize and centre crop do nothing to them. What is left is
rescale and normalise, which transformers' PIL backend runs one image at a time (float64 rescale, then a
float32 normalise). Measured here, that per-image work was two thirds of AnyRes preprocessing.

Pixels are uint8, so every channel has only 256 possible outputs: they are computed once per processor,
with the backend's own functions in its own order, and looked up. The result is bit-identical to the
processor's (tests/models/test_fast_pixels.py), and any image or processor setting outside this case goes
to the processor unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_transforms import normalize, rescale
from transformers.image_utils import ChannelDimension

_TABLES: dict[tuple, np.ndarray] = {}


def _identity_size(processor: PilBackend) -> int | None:
    """The side S for which resize + centre crop leave an S x S image as it is, or None when none does."""
    size, crop = processor.size, processor.crop_size
    side = None
    if processor.do_resize:
        if size.shortest_edge and not size.longest_edge:
            side = size.shortest_edge
        elif size.height and size.height == size.width:
            side = size.height
        else:
            return None
    if processor.do_center_crop:
        if not crop or not crop.height or crop.height != crop.width or (side is not None and side != crop.height):
            return None
        side = crop.height
    return side


def _table(processor: PilBackend) -> np.ndarray:
    """(3, 256) float32: each channel's output for each uint8 value, by the backend's own rescale + normalise."""
    key = (processor.do_rescale, processor.rescale_factor, processor.do_normalize, tuple(processor.image_mean or ()),
           tuple(processor.image_std or ()))
    if key not in _TABLES:
        values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (1, 256, 3)).copy()  # an HWC image
        out = values
        if processor.do_rescale:
            out = rescale(out, processor.rescale_factor, input_data_format=ChannelDimension.LAST)
        if processor.do_normalize:
            out = normalize(out, processor.image_mean, processor.image_std, input_data_format=ChannelDimension.LAST)
        _TABLES[key] = np.ascontiguousarray(out.astype(np.float32, copy=False)[0].T)
    return _TABLES[key]


def fast_pixels(images: Sequence[Image.Image], processor: object) -> torch.Tensor | None:
    """(N, 3, S, S) float32 pixels equal to `processor(images)["pixel_values"]`, or None when this path does not
    apply: not transformers' plain PIL backend, padding on, or any image not RGB at the size S that resize and
    crop leave unchanged."""
    if not images or not isinstance(processor, PilBackend) or type(processor)._preprocess is not PilBackend._preprocess:
        return None
    if getattr(processor, "do_pad", None) or not (processor.do_rescale or processor.do_normalize):
        return None
    side = _identity_size(processor)
    if side is None or any(im.mode != "RGB" or im.size != (side, side) for im in images):
        return None
    table = _table(processor)
    pixels = np.stack([np.asarray(im) for im in images])  # (N, S, S, 3) uint8
    out = np.empty((len(images), 3, side, side), dtype=np.float32)
    for c in range(3):
        out[:, c] = table[c][pixels[..., c]]  # a lookup per channel, written straight into NCHW
    return torch.from_numpy(out)


__all__ = ["fast_pixels"]
