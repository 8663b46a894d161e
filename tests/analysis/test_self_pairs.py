"""Self-generated pairs: ranking by the truth, the chosen always ranks better, the CLI writes a
preference file that the dpo stage reads."""

from __future__ import annotations

import pytest

from lmmkit.analysis.self_pairs import caption_rank, self_generated_pairs
from lmmkit.data.shapes.world import CLASSES
from lmmkit.eval.chair import ObjectVocabulary

VOCAB = ObjectVocabulary({c: [c] for c in CLASSES})


def test_rank_prefers_fewer_hallucinations_then_more_truth():
    truth = ["red circle", "blue square"]
    clean_full = caption_rank("a red circle and a blue square", truth, VOCAB)
    clean_half = caption_rank("a red circle", truth, VOCAB)
    one_fake = caption_rank("a red circle, a blue square and a green star", truth, VOCAB)
    assert clean_full == (0, -2) and clean_half == (0, -1) and one_fake == (1, -2)
    assert sorted([one_fake, clean_half, clean_full]) == [clean_full, clean_half, one_fake]


def test_pairs_from_sampled_captions_rank_chosen_above_rejected(tmp_path, one_torch_thread):
    import random

    from lmmkit.data.shapes.render import render_scene
    from lmmkit.data.shapes.world import World
    from lmmkit.models.build import build_vlm

    world, rng = World(), random.Random(0)
    scenes = [world.sample_scene(rng, f"s{k}", held_out=False) for k in range(6)]
    paths = []
    for s in scenes:
        render_scene(s).save(tmp_path / f"{s.id}.png")
        paths.append(tmp_path / f"{s.id}.png")
    model = build_vlm("shipped:lm", "shipped:vision")
    pairs = self_generated_pairs(model, paths, [s.names for s in scenes], VOCAB, samples=4, max_new_tokens=24,
                                 seed=0)
    again = self_generated_pairs(model, paths, [s.names for s in scenes], VOCAB, samples=4, max_new_tokens=24,
                                 seed=0)
    assert len(pairs) >= 2  # sampled captions differ in their hallucinations
    assert [(p.chosen, p.rejected) for p in pairs] == [(p.chosen, p.rejected) for p in again]  # seeded
    truth = {str(p): s.names for p, s in zip(paths, scenes, strict=True)}
    for p in pairs:
        t = truth[str(p.images[0])]
        assert caption_rank(p.chosen, t, VOCAB) < caption_rank(p.rejected, t, VOCAB)
        p.validate()
    with pytest.raises(ValueError, match="at least 2 samples"):
        self_generated_pairs(model, paths, [s.names for s in scenes], VOCAB, samples=1)


def test_cli_writes_pairs_the_dpo_loader_reads(shipped_checkpoint, tmp_path, capsys):
    from lmmkit.cli import main
    from lmmkit.data.formats.preference import read_preferences
    from lmmkit.data.shapes.generate import generate_shapes

    data = tmp_path / "shapes"
    generate_shapes(data, seed=0, n_train=6, n_test=1, n_pope_images=0, workers=1, progress=False)
    assert main(["data", "self-prefs", "--data", str(data), "--model", str(shipped_checkpoint), "--n", "6",
                 "--samples", "3"]) == 0
    out = capsys.readouterr().out
    assert "self-generated pairs from 6 images" in out
    records = list(read_preferences(data / "train" / "self_preferences.json", data / "images", policy="stop"))
    assert all(r.id.endswith("-self") and r.chosen != r.rejected for r in records)
