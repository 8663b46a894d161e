"""Fixtures for the training tests: tiny HF checkpoints on disk, tiny datasets, a clean accelerate state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Short answers a tiny model can memorise; the colour is visible in the image.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTIONS = ["What colour is the square?", "Describe the image briefly."]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed_precision; each test gets a fresh one, as a fresh `lmmkit train` process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def clip_vlm(tiny_llama_dir, tiny_clip_dir):
    """A fresh tiny Llama + CLIP model (bridge seeded), so every test starts from the same weights."""
    from lmmkit.models.build import build_vlm

    return build_vlm(str(tiny_llama_dir), str(tiny_clip_dir), vision_select_layer=-2, seed=0)


def write_llava_dataset(root: Path, n: int = 8) -> tuple[Path, Path]:
    """n LLaVA records, each with its own PNG (a coloured square on grey); returns (json file, image folder)."""
    from PIL import Image, ImageDraw

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        colour = names[i % len(names)]
        im = Image.new("RGB", (40, 40), (128, 128, 128))
        ImageDraw.Draw(im).rectangle((6 + i, 6, 30, 30 - i % 3), fill=COLOURS[colour])
        im.save(images / f"img{i}.png")
        question = QUESTIONS[i % len(QUESTIONS)]
        records.append({"id": f"rec-{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": f"The square is {colour}."},
        ]})
    data = root / "conversations.json"
    data.write_text(json.dumps(records, indent=1))
    return data, images


@pytest.fixture
def make_llava_data():
    """write_llava_dataset(root, n=8) -> (json file, image folder)."""
    return write_llava_dataset


@pytest.fixture
def llava_data(tmp_path) -> tuple[Path, Path]:
    return write_llava_dataset(tmp_path / "data")


@pytest.fixture
def encoded_samples(clip_vlm, llava_data):
    """The 8 tiny records encoded for clip_vlm (image paths, assistant-only labels)."""
    from lmmkit.train.run import load_samples

    data, images = llava_data
    samples, counter = load_samples(clip_vlm, data, images, max_length=128, policy="stop")
    assert len(samples) == 8 and counter.total == 0
    return samples


VARIED_MAX_LEN = 128  # varied_samples pack two or three to a row of this width


@pytest.fixture
def varied_max_len() -> int:
    """The packed-row width the varied_samples are made for (test modules cannot import conftest: another
    test folder's conftest may hold that module name)."""
    return VARIED_MAX_LEN


@pytest.fixture
def varied_samples(clip_vlm, make_llava_data, tmp_path) -> list:
    """8 samples of 50 to 110 tokens (answers of 1 to 8 sentences): lengths that pack into rows of 128."""
    from lmmkit.train.run import load_samples

    data, images = make_llava_data(tmp_path / "varied")
    records = json.loads(data.read_text())
    for i, record in enumerate(records):
        record["conversations"][1]["value"] = " ".join(["The square is red."] * (i % 8 + 1))
    data.write_text(json.dumps(records))
    samples, _ = load_samples(clip_vlm, data, images, max_length=VARIED_MAX_LEN, policy="stop")
    assert len(samples) == 8 and max(len(s.input_ids) for s in samples) - min(len(s.input_ids) for s in samples) > 30
    return samples
