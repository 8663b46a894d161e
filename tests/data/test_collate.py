from __future__ import annotations

import logging

import pytest
import torch

from lmmkit.data.collate import expand_image_tokens, fit_to_length, pad_batch

IMG = 99
X = -100


def test_expand_single_count() -> None:
    ids, labels = expand_image_tokens([1, IMG, 2, 3], [X, X, 2, 3], IMG, 3)
    assert ids == [1, IMG, IMG, IMG, 2, 3]
    assert labels == [X, X, X, X, 2, 3]


def test_expand_per_image_counts_and_labels_masked() -> None:
    # Even a (wrongly) labelled image token must come out masked.
    ids, labels = expand_image_tokens([IMG, 5, IMG], [IMG, 5, X], IMG, [2, 4])
    assert ids == [IMG, IMG, 5, IMG, IMG, IMG, IMG]
    assert labels == [X, X, 5, X, X, X, X]


def test_expand_no_images_is_identity() -> None:
    assert expand_image_tokens([1, 2], [X, 2], IMG, 576) == ([1, 2], [X, 2])


@pytest.mark.parametrize(("counts", "match"), [([2], "2 image token"), ([2, 0], ">= 1")])
def test_expand_rejects_bad_counts(counts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expand_image_tokens([IMG, IMG], [X, X], IMG, counts)


def test_expand_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError):
        expand_image_tokens([1, 2], [1], IMG, 1)


def test_fit_short_is_unchanged() -> None:
    assert fit_to_length([1, 2, 3], [X, 2, 3], 3, IMG, "w") == ([1, 2, 3], [X, 2, 3])


def test_fit_truncates_when_safe() -> None:
    ids = [IMG, IMG, 1, 2, 3, 4]
    labels = [X, X, X, 2, 3, 4]
    assert fit_to_length(ids, labels, 4, IMG, "w") == ([IMG, IMG, 1, 2], [X, X, X, 2])


def test_fit_drops_when_cut_splits_image(caplog) -> None:
    ids = [1, IMG, IMG, IMG, 2]
    labels = [X, X, X, X, 2]
    with caplog.at_level(logging.WARNING, logger="lmmkit.data"):
        assert fit_to_length(ids, labels, 3, IMG, "train.json#5 (id=q)") is None
    assert "train.json#5 (id=q)" in caplog.text and "image" in caplog.text


def test_fit_drops_when_image_entirely_beyond_cut() -> None:
    assert fit_to_length([1, 2, 3, IMG], [X, 2, 3, X], 3, IMG, "w") is None


def test_fit_drops_when_no_label_survives(caplog) -> None:
    ids = [1, 2, 3, 4, 5]
    labels = [X, X, X, 4, 5]
    with caplog.at_level(logging.WARNING, logger="lmmkit.data"):
        assert fit_to_length(ids, labels, 3, IMG, "rec-7") is None
    assert "rec-7" in caplog.text


def test_pad_right() -> None:
    batch = pad_batch([([1, 2, 3], [X, 2, 3]), ([4], [4])], pad_id=0, multiple_of=1)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[X, 2, 3], [4, X, X]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_left() -> None:
    batch = pad_batch([([1, 2, 3], [X, 2, 3]), ([4], [4])], pad_id=0, side="left", multiple_of=1)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[X, 2, 3], [X, X, 4]]


def test_pad_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pad_batch([], 0)
    with pytest.raises(ValueError, match="labels"):
        pad_batch([([1, 2], [1])], 0)
    with pytest.raises(ValueError, match="side"):
        pad_batch([([1], [1])], 0, side="middle")  # type: ignore[arg-type]


def test_pad_rounds_width_up_to_multiple() -> None:
    batch = pad_batch([([1, 2, 3], [1, 2, 3]), ([4], [4])], pad_id=0, side="left", multiple_of=4)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert pad_batch([([1] * 33, [1] * 33)], 0)["input_ids"].shape == (1, 64)
