"""apply_stage: exactly the documented parts train, the rest is frozen, and it says so."""

from __future__ import annotations

import pytest

from lmmkit.train.stages import apply_stage, trainable_parts

EXPECTED = {
    ("align", False): {"bridge"},
    ("sft", False): {"bridge", "llm"},
    ("sft", True): {"bridge", "llm", "vision"},
    ("dpo", False): {"bridge", "llm"},
    ("dpo", True): {"bridge", "llm", "vision"},
    ("full", False): {"bridge", "llm", "vision"},
}


def _size(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("stage", "tower"), list(EXPECTED))
def test_apply_stage_sets_requires_grad_exactly(clip_vlm, stage, tower):
    model = clip_vlm
    # Start from the opposite of what the stage wants, so nothing passes by accident.
    for name in ("vision", "bridge", "llm"):
        getattr(model, name).requires_grad_(name not in EXPECTED[stage, tower])
    counts = apply_stage(model, stage, train_vision_tower=tower, verbose=False)
    trains = EXPECTED[stage, tower]
    assert set(trainable_parts(stage, tower)) == trains
    for name in ("vision", "bridge", "llm"):
        module = getattr(model, name)
        flags = {p.requires_grad for p in module.parameters()}
        assert flags == {name in trains}, f"{stage}: {name} requires_grad {flags}"
        assert module.training == (name in trains), f"{stage}: {name} train mode"
        assert counts[name] == (_size(module) if name in trains else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(counts.values()) == trainable


def test_a_later_stage_refreezes(clip_vlm):
    apply_stage(clip_vlm, "full", verbose=False)
    apply_stage(clip_vlm, "align", verbose=False)
    assert not any(p.requires_grad for p in clip_vlm.llm.parameters())
    assert not any(p.requires_grad for p in clip_vlm.vision.parameters())
    assert all(p.requires_grad for p in clip_vlm.bridge.parameters())


def test_train_vision_tower_only_matters_for_sft_and_dpo():
    assert trainable_parts("align", True) == ("bridge",)
    assert set(trainable_parts("full", False)) == {"bridge", "llm", "vision"}


def test_apply_stage_prints_what_trains(clip_vlm, capsys):
    model = clip_vlm
    counts = apply_stage(model, "align")
    out = capsys.readouterr().out
    bridge, total = _size(model.bridge), _size(model)
    assert counts == {"vision": 0, "bridge": bridge, "llm": 0}
    assert "stage align: training bridge" in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:4]}
    assert "frozen" in lines["vision"] and f"{_size(model.vision):,}" in lines["vision"]
    assert "trains" in lines["bridge"] and f"{bridge:,}" in lines["bridge"]
    assert "frozen" in lines["llm"] and f"{_size(model.llm):,}" in lines["llm"]
    assert f"trainable {bridge:,} of {total:,}" in out

    apply_stage(model, "sft")
    out = capsys.readouterr().out
    assert "stage sft: training bridge, llm" in out
    assert f"trainable {bridge + _size(model.llm):,} of {total:,}" in out


def test_unknown_stage_is_an_error_listing_the_stages(clip_vlm):
    with pytest.raises(ValueError, match="align, sft, dpo, full"):
        apply_stage(clip_vlm, "pretrain", verbose=False)
