"""PixelTransform: the same pixels as the HF image processor, bit for bit; draft decoding close to them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from lmmkit.data.image_ref import ImageRef, open_image
from lmmkit.data.pixels import PixelTransform, collate_pixels, normalise_pixels
from lmmkit.data.schema import ConversationRecord, DataError, Message

PROCESSORS = {
    "clip-224": lambda: CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
    "clip-336": lambda: CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    "resize-256-crop-224": lambda: CLIPImageProcessorPil(size={"shortest_edge": 256},
                                                         crop_size={"height": 224, "width": 224}),
    "siglip-224": lambda: SiglipImageProcessorPil(size={"height": 224, "width": 224}),
}
SIZES = [(480, 640), (500, 375), (333, 1001), (100, 150), (224, 224), (61, 700)]  # (height, width)


def encoded(h: int, w: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1) + rng.integers(-20, 20, (h, w, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def record(*images) -> ConversationRecord:
    tags = "\n".join("<image>" for _ in images)
    return ConversationRecord("r1", [Message("user", f"{tags}\nDescribe."), Message("assistant", "A picture.")],
                              list(images), source="test#1")


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_same_pixels_as_the_processor(name, tmp_path, one_torch_thread):
    proc = PROCESSORS[name]()
    refs = [ImageRef(encoded(h, w, seed=i), f"img{i}.jpg", "jpg") for i, (h, w) in enumerate(SIZES)]
    refs.append(ImageRef(encoded(90, 120, "PNG", "RGBA"), "rgba.png", "png"))
    refs.append(ImageRef(encoded(120, 90, "PNG", "L"), "grey.png", "png"))
    path = tmp_path / "file.jpg"
    path.write_bytes(encoded(300, 400, seed=9))
    images = [*refs, path]
    sample = PixelTransform(proc)(record(*images))
    expected = proc(images=[open_image(im, "test") for im in images], return_tensors="pt")["pixel_values"]
    assert sample.pixel_values.shape == expected.shape and torch.equal(sample.pixel_values, expected)
    assert sample.id == "r1" and sample.where == "test#1 (id=r1)"


def test_uint8_crops_normalise_later_to_the_same_pixels(one_torch_thread):
    for name in ("clip-336", "siglip-224"):
        proc = PROCESSORS[name]()
        rec = record(ImageRef(encoded(480, 640), "a.jpg"), ImageRef(encoded(500, 375, seed=3), "b.jpg"))
        exact = PixelTransform(proc)(rec).pixel_values
        crops = PixelTransform(proc, normalise=False)(rec).pixel_values
        side = exact.shape[-1]
        assert crops.dtype == torch.uint8 and crops.shape == (2, side, side, 3)
        assert torch.equal(normalise_pixels(crops, proc), exact)
        assert torch.equal(normalise_pixels(crops, proc, device="cpu"), exact)  # the torch path (GPUs)
    with pytest.raises(ValueError, match="normalise=False needs transformers' plain PIL image processor"):
        PixelTransform(lambda images, return_tensors: None, normalise=False)
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 3\) uint8"):
        normalise_pixels(exact, proc)


def test_draft_decoding_is_close_and_only_for_large_jpegs(one_torch_thread):
    proc = PROCESSORS["clip-224"]()
    big, small = encoded(960, 1280, seed=1), encoded(300, 400, seed=2)
    exact = PixelTransform(proc)(record(ImageRef(big, "big.jpg"), ImageRef(small, "small.jpg"))).pixel_values
    draft = PixelTransform(proc, draft=True)(record(ImageRef(big, "big.jpg"), ImageRef(small, "small.jpg")))
    diff = (draft.pixel_values - exact).abs()
    assert torch.equal(draft.pixel_values[1], exact[1])  # 300 px: no DCT scale still covers 224, decoded in full
    assert 0 < diff[0].mean() < 0.02 and diff[0].max() < 0.5  # normalised units (about 1/255 = 0.015)


def test_bad_images_raise_data_errors_naming_the_image(one_torch_thread):
    proc = PROCESSORS["clip-224"]()
    cut = encoded(480, 640)[:3000]
    for draft in (False, True):
        with pytest.raises(DataError, match=r"test#1 \(id=r1\): image cut\.jpg is truncated"):
            PixelTransform(proc, draft=draft)(record(ImageRef(cut, "cut.jpg")))
        with pytest.raises(DataError, match="cannot read image junk.jpg"):
            PixelTransform(proc, draft=draft)(record(ImageRef(b"\xff\xd8\xff junk", "junk.jpg")))


def test_other_processors_are_called_as_they_are_and_batches_collate(one_torch_thread):
    class Halves:
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.stack([torch.full((3, 4, 4), 0.5) for _ in images])}

    sample = PixelTransform(Halves())(record(ImageRef(encoded(20, 30), "a.jpg"), ImageRef(encoded(30, 20), "b.jpg")))
    assert sample.pixel_values.shape == (2, 3, 4, 4) and float(sample.pixel_values.mean()) == 0.5
    text_only = PixelTransform(PROCESSORS["clip-224"]())(
        ConversationRecord("t", [Message("user", "Hi"), Message("assistant", "Hello")]))
    assert text_only.pixel_values.shape == (0, 3, 224, 224)
    batch = collate_pixels([sample, text_only, sample])
    assert batch.ids == ["r1", "t", "r1"] and batch.images_per_sample == [2, 0, 2]
    assert batch.pixel_values.shape == (4, 3, 4, 4)
