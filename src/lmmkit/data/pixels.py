"""Records -> pixel tensors in data-loader workers: decode + a fixed-size image processor, pixel-exact.

`PixelTransform(processor)` turns a ConversationRecord into a `PixelSample` whose `pixel_values` equal
`processor(images=[the decoded RGB images])["pixel_values"]` bit for bit. For transformers' PIL backend
with a shortest-edge (or height x width) resize and a centre crop (CLIP, SigLIP, ...) it does the same
work the processor does, in the same order, with less around it: PIL's resize with the processor's
output size and filter, the same crop, then rescale + normalise as one table lookup per channel
(`lmmkit.models.fast_pixels`, bit-identical). Any other processor is called as is.

`normalise=False` stops before rescale + normalise: `pixel_values` are the uint8 crops, (N, H, W, 3), a
quarter of the bytes to send from a DataLoader worker to the trainer (float32 pixels cost more in shared-memory
page faults than the lookup that makes them); `normalise_pixels` then gives the processor's exact float
pixels, on any device.

`draft=True` is an approximation, off by default: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when
that still leaves at least the resize's output size (libjpeg's DCT scaling: far less to decode and
to resize). The pixels then differ slightly from the processor's (docs/data.md gives the size of the
difference); everything else is unchanged.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmmkit.data.check import REASON_BOMB, data_error
from lmmkit.data.image_ref import ImageRef, decode_image_bytes, open_image
from lmmkit.data.images import DEFAULT_MAX_PIXELS
from lmmkit.data.schema import ConversationRecord, DataError, Message
from lmmkit.models.fast_pixels import _table


@dataclass
class PixelSample:
    id: str
    messages: list[Message]
    pixel_values: torch.Tensor  # (images, 3, H, W) float32, or (images, H, W, 3) uint8 with normalise=False
    where: str = ""


@dataclass
class PixelBatch:
    ids: list[str]
    messages: list[list[Message]]
    pixel_values: torch.Tensor  # all images of the batch, in order
    images_per_sample: list[int] = field(default_factory=list)


def collate_pixels(samples: list[PixelSample]) -> PixelBatch:
    """One batch: every image of every sample in order (text-only samples add none). In a DataLoader worker
    the batch is built in shared memory, as torch's default_collate does, so it is not copied again to
    reach the main process."""
    from torch.utils.data import get_worker_info

    pixels = [s.pixel_values for s in samples if len(s.pixel_values)] or [samples[0].pixel_values]
    out = None
    if get_worker_info() is not None:
        first = pixels[0]
        shape = (sum(len(p) for p in pixels), *first.shape[1:])
        storage = first.untyped_storage()._new_shared(math.prod(shape) * first.element_size())
        out = first.new_empty(0).set_(storage).view(shape)
    return PixelBatch([s.id for s in samples], [s.messages for s in samples], torch.cat(pixels, out=out),
                      [len(s.pixel_values) for s in samples])


def _plain_pil(processor: object) -> bool:
    """Transformers' PIL backend with its own resize, crop and preprocessing (nothing overridden)."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:
        return False
    cls = type(processor)
    return (isinstance(processor, PilBackend) and cls._preprocess is PilBackend._preprocess
            and cls.resize is PilBackend.resize and cls.center_crop is PilBackend.center_crop
            and not getattr(processor, "do_pad", None))


def resize_target(width: int, height: int, processor) -> tuple[int, int] | None:
    """(width, height) the processor resizes an image of this size to; None when not a plain size rule."""
    size = processor.size
    if not processor.do_resize:
        return width, height
    if size.shortest_edge and not size.longest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size.shortest_edge * long / short)  # transformers' get_resize_output_image_size
        return (size.shortest_edge, new_long) if width <= height else (new_long, size.shortest_edge)
    if size.height and size.width and not size.shortest_edge:
        return size.width, size.height
    return None


def resize_crop(image: Image.Image, processor, target: tuple[int, int] | None = None) -> Image.Image:
    """The processor's resize and centre crop on an RGB image (uint8 pixels, as the processor computes them).
    `target` is the resize output size (default: from the image's own size)."""
    target = target or resize_target(image.width, image.height, processor)
    if processor.do_resize and image.size != target:  # PIL returns a copy for the same size: skipping is exact
        resample = processor.resample if processor.resample is not None else Image.BILINEAR
        image = image.resize(target, resample=resample)
    if processor.do_center_crop:
        ch, cw = processor.crop_size.height, processor.crop_size.width
        top, left = (image.height - ch) // 2, (image.width - cw) // 2
        image = image.crop((left, top, left + cw, top + ch))
    return image


def _fits(width: int, height: int, processor) -> bool:
    """The exact path applies: a plain size rule, the crop inside the resized image, something to normalise."""
    target = resize_target(width, height, processor)
    if target is None or not (processor.do_rescale or processor.do_normalize):
        return False
    if processor.do_center_crop:
        crop = processor.crop_size
        return bool(crop.height and crop.width) and crop.height <= target[1] and crop.width <= target[0]
    return True


def normalise(images: list[Image.Image], processor) -> torch.Tensor:
    """(N, 3, H, W) float32: the processor's rescale + normalise of same-size RGB images, by table lookup."""
    table = _table(processor)
    pixels = np.stack([np.asarray(im) for im in images])  # (N, H, W, 3) uint8
    out = np.empty((len(images), 3, *pixels.shape[1:3]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[..., c], out=out[:, c])
    return torch.from_numpy(out)


def _full(data: bytes, name: str, where: str, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    im = decode_image_bytes(data, name, where, max_pixels)
    return im, im.size


def normalise_pixels(pixels: torch.Tensor, processor, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 crops (PixelTransform with normalise=False) -> the processor's (N, 3, H, W) float32
    pixels, bit for bit (the same per-channel table as `normalise`). Without `device`: on the CPU with numpy;
    with one (a GPU, where the batch goes anyway): torch there."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 pixels, got {tuple(pixels.shape)} {pixels.dtype}")
    if device is None:
        array = pixels.numpy()
        out = np.empty((len(array), 3, *array.shape[1:3]), dtype=np.float32)
        table = _table(processor)
        for c in range(3):
            np.take(table[c], array[..., c], out=out[:, c])
        return torch.from_numpy(out)
    table = torch.from_numpy(_table(processor)).to(device)
    index = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).long()
    return torch.stack([table[c][index[:, c]] for c in range(3)], dim=1)


def decode_draft(data: bytes, name: str, where: str, processor, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[Image.Image, tuple[int, int]]:
    """A JPEG decoded at the smallest DCT scale that still covers the resize target (other formats in full),
    and the image's full size. Errors are the DataErrors `decode_image_bytes` raises."""
    try:
        im = Image.open(io.BytesIO(data))
        full = im.size
    except Exception:  # noqa: BLE001 - decode_image_bytes names what is wrong
        return _full(data, name, where, max_pixels)
    if full[0] * full[1] > max_pixels:
        raise data_error(f"{where}: decompression bomb: image {name} claims {full[0]}x{full[1]} = "
                         f"{full[0] * full[1]:,} pixels, more than the limit of {max_pixels:,}", REASON_BOMB)
    target = resize_target(*full, processor)
    if im.format != "JPEG" or target is None:
        return _full(data, name, where, max_pixels)
    try:
        im.draft("RGB", target)
        rgb = im.convert("RGB")
        rgb.load()
    except Exception:  # noqa: BLE001 - a corrupt body: decode again the normal way for the proper error
        return _full(data, name, where, max_pixels)
    return rgb, full


class PixelTransform:
    """record -> PixelSample (see the module docstring). Picklable: it can go to DataLoader workers."""

    def __init__(self, processor, draft: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 normalise: bool = True) -> None:
        self.processor, self.draft, self.max_pixels, self.normalise = processor, draft, max_pixels, normalise
        self.exact = _plain_pil(processor)
        if not normalise:
            crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
            size = getattr(processor, "size", None)
            fixed = bool(crop and crop.height and crop.width) or bool(size and size.height and size.width)
            if not (self.exact and fixed and (processor.do_rescale or processor.do_normalize)):
                raise ValueError(f"normalise=False needs transformers' plain PIL image processor with a fixed output "
                                 f"size (centre crop or height x width); {type(processor).__name__} is not one")

    def _decode(self, image, where: str) -> tuple[Image.Image, tuple[int, int]]:
        """(decoded RGB image, the image's full size): draft-decoded JPEGs are smaller than their full size."""
        if self.draft and self.exact and not isinstance(image, Image.Image):
            if isinstance(image, ImageRef):
                return decode_draft(image.data, image.name, where, self.processor, self.max_pixels)
            try:
                data = Path(image).read_bytes()
            except OSError:
                im = open_image(image, where, self.max_pixels)  # raises the missing-image DataError
                return im, im.size
            return decode_draft(data, str(image), where, self.processor, self.max_pixels)
        im = open_image(image, where, self.max_pixels)
        return im, im.size

    def pixels(self, images: list, where: str) -> torch.Tensor:
        """(N, 3, H, W) pixels of any record images (paths, PIL images, ImageRefs); DataErrors name `where`."""
        decoded = [self._decode(img, where) for img in images]
        if not self.exact:
            return self.processor(images=[im for im, _ in decoded], return_tensors="pt")["pixel_values"]
        out = []
        for im, full in decoded:
            if not _fits(*full, self.processor):
                if not self.normalise:
                    raise DataError(f"{where}: a {full[0]}x{full[1]} image does not cover the processor's crop; "
                                    "normalise=False cannot pad it (use normalise=True)")
                out.append(self.processor(images=[im], return_tensors="pt")["pixel_values"])
                continue
            crop = resize_crop(im, self.processor, resize_target(*full, self.processor))
            out.append(normalise([crop], self.processor) if self.normalise else torch.from_numpy(np.array(crop))[None])
        return torch.cat(out)

    def __call__(self, record: ConversationRecord) -> PixelSample:
        if not record.images:
            side = getattr(getattr(self.processor, "crop_size", None), "height", None) or 1
            empty = torch.zeros(0, 3, side, side) if self.normalise else torch.zeros(0, side, side, 3, dtype=torch.uint8)
            return PixelSample(record.id, list(record.messages), empty, record.where)
        try:
            pixels = self.pixels(record.images, record.where)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a processor failure on one record is that record's problem
            raise DataError(f"{record.where}: image processor failed: {type(e).__name__}: {e}") from e
        return PixelSample(record.id, list(record.messages), pixels, record.where)
