"""Tests for lmmkit.config: defaults, YAML + overrides, error messages, round trip, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmmkit.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: str | Path | None, overrides: list[str] | None = None, *, d: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        if d is not None:
            config_from_dict(d, source="saved.yaml")
        else:
            load_config(path, overrides or [])
    return str(info.value)


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.llm == "shipped:lm" and cfg.model.vision == "shipped:vision"
    assert cfg.model.bridge == "mlp" and cfg.model.bridge_layers == 2
    assert cfg.data.train is None and cfg.data.max_length == 512
    assert cfg.train.stage == "sft" and cfg.train.lr == 1e-3 and cfg.train.uses_feature_cache
    assert config_from_dict({}) == cfg and config_from_dict(None) == cfg


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  bridge_layers: 1\ntrain:\n  lr: 1e-3\n  batch_size: 4\n  epochs: 2\ndata:\n")
    cfg = load_config(path, ["train.lr=3e-4", "train.batch_size=8", "train.batch_size=2", "train.precision=fp32"])
    assert cfg.model.bridge_layers == 1  # from the file
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.lr == pytest.approx(3e-4)  # "3e-4" is a string to PyYAML; still a number here
    assert cfg.train.batch_size == 2  # the last override wins
    assert cfg.train.precision == "fp32"


def test_override_values_are_yaml_but_strings_stay_as_typed(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.output_dir=2024", "train.train_vision_tower=true",
                             "train.cache_vision_features=false", "data.eval=null", "train.max_steps=1e3"])
    assert cfg.train.output_dir == "2024"
    assert cfg.train.train_vision_tower is True and cfg.data.eval is None
    assert cfg.train.max_steps == 1000


def test_unknown_key_suggests_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    msg = errors_of(path)
    assert f"{path}: unknown key 'train.lrr'; did you mean 'train.lr'?" in msg
    assert "allowed keys in train: stage, train_vision_tower" in msg


def test_key_in_the_wrong_section_is_pointed_out() -> None:
    msg = errors_of(None, ["model.lr=0.1"])
    assert "command line: unknown key 'model.lr'; did you mean 'train.lr'?" in msg


def test_unknown_and_malformed_sections(tmp_path: Path) -> None:
    msg = errors_of(write(tmp_path, "trian:\n  lr: 1\nlr: 2\ndata: [a, b]\n"))
    assert "run.yaml: unknown section 'trian'; did you mean 'train'? allowed sections: model, data, train" in msg
    assert "unknown section 'lr'; did you mean 'train.lr'" in msg
    assert "run.yaml: section 'data' must be a mapping" in msg
    assert "expected a mapping" in errors_of(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_literal_choice_error(tmp_path: Path) -> None:
    msg = errors_of(write(tmp_path, "train:\n  stage: algin\n"))
    assert "run.yaml: train.stage: 'algin' is not allowed; choose one of: align, sft, dpo, full" in msg
    assert "did you mean 'align'?" in msg


@pytest.mark.parametrize(("override", "expected"), [
    ("train.lr=-1", "train.lr: expected a number > 0, got -1"),
    ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
    ("train.batch_size=true", "train.batch_size: expected an integer, got true"),
    ("train.batch_size=2.5", "train.batch_size: expected an integer, got 2.5"),
    ("train.grad_accum=0", "train.grad_accum: expected an integer >= 1, got 0"),
    ("train.warmup_ratio=1", "train.warmup_ratio: expected a number in [0, 1), got 1"),
    ("train.max_grad_norm=-0.5", "train.max_grad_norm: expected a number > 0 (or 0 to disable clipping)"),
    ("model.bridge_layers=3", "model.bridge_layers: expected 1 or 2, got 3"),
    ("model.vision_drop_cls=maybe", "model.vision_drop_cls: expected true or false, got 'maybe'"),
    ("train.output_dir=", "train.output_dir: expected a non-empty string"),
    ("model.llm=shipped:vision", "model.llm: 'shipped:vision' is not a shipped part; the shipped LM is 'shipped:lm'"),
])
def test_value_errors_name_origin_and_key(override: str, expected: str) -> None:
    assert f"command line: {expected}" in errors_of(None, [override])


def test_value_error_from_file_names_file(tmp_path: Path) -> None:
    msg = errors_of(write(tmp_path, "data:\n  max_length: 0\n"))
    assert f"{tmp_path / 'run.yaml'}: data.max_length: expected an integer > 0, got 0" in msg


def test_malformed_overrides() -> None:
    msg = errors_of(None, ["train.lr", "lr=3", "trian.lr=1"])
    assert "override 'train.lr' has no '='" in msg
    assert "override 'lr=3': the key must be SECTION.KEY" in msg and "did you mean 'train.lr'?" in msg
    assert "unknown section 'trian'; did you mean 'train'?" in msg


def test_all_errors_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lrr: 1\n  stage: algin\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.batch_size=abc"])
    assert len(info.value.errors) == 3
    assert str(info.value).count("\n") == 2
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("stage_overrides", [["train.stage=full"], ["train.train_vision_tower=true"]])
def test_feature_cache_needs_a_frozen_tower(stage_overrides: list[str]) -> None:
    msg = errors_of(None, [*stage_overrides, "train.cache_vision_features=true"])
    assert "command line: train.cache_vision_features: true needs a frozen vision tower" in msg
    # Left unset, the cache is simply switched off when the tower trains.
    cfg = load_config(None, stage_overrides)
    assert cfg.train.trains_vision_tower and not cfg.train.cache_vision_features


def test_align_cannot_train_the_tower() -> None:
    msg = errors_of(None, ["train.stage=align", "train.train_vision_tower=true"])
    assert "train.train_vision_tower: stage 'align' trains only the bridge" in msg


def test_file_problems(tmp_path: Path) -> None:
    assert "missing.yaml: no such config file" in errors_of(tmp_path / "missing.yaml")
    msg = errors_of(write(tmp_path, "train:\n  lr: [1\n", "bad.yaml"))
    assert "bad.yaml:" in msg and "not valid YAML" in msg


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.stage=full", "model.vision_select_layer=-2", "data.train=/d/train.json"])
    d = config_to_dict(cfg)
    assert d["train"]["stage"] == "full" and d["model"]["vision_select_layer"] == -2
    assert config_from_dict(d) == cfg
    assert load_config(save_config(cfg, tmp_path / "ckpt" / "config.yaml")) == cfg


def test_config_from_dict_names_its_source() -> None:
    assert "saved.yaml: train.seed: expected an integer >= 0, got -3" in errors_of(None, d={"train": {"seed": -3}})


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "models" / "llm").mkdir(parents=True)
    path = write(conf, "\n".join([
        "model:",
        "  llm: models/llm",                            # contains '/' and exists there: a folder
        "  vision: openai/clip-vit-large-patch14-336",  # does not exist there: a hub id, kept
        "data:",
        "  train: data/train.json",
        "  image_folder: ../images",
        "  eval: /abs/eval.json",
        "train:",
        "  init_from: ./ckpt",
        "  output_dir: runs/x",
    ]))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["model.vision=../towers/clip"])
    assert cfg.model.llm == str(conf / "models" / "llm")
    assert cfg.data.train == str(conf / "data" / "train.json")
    assert cfg.data.image_folder == str(tmp_path / "images")
    assert cfg.data.eval == "/abs/eval.json"
    assert cfg.train.init_from == str(conf / "ckpt")
    assert cfg.train.output_dir == "runs/x"  # outputs stay relative to the working directory
    assert cfg.model.vision == str(tmp_path.parent / "towers" / "clip")  # override: relative to the cwd
    assert load_config(path).model.vision == "openai/clip-vit-large-patch14-336"
    assert load_config(None, ["model.llm=shipped:lm"]).model.llm == "shipped:lm"


def test_config_from_dict_resolves_against_a_given_base(tmp_path: Path) -> None:
    d = {"model": {"llm": "shipped:lm", "vision": "openai/clip-vit-large-patch14-336"},
         "data": {"train": "data/train.json"}, "train": {"init_from": "runs/align", "output_dir": "runs/sft"}}
    assert config_from_dict(d).train.init_from == "runs/align"  # no base: as given
    cfg = config_from_dict(d, base=tmp_path)
    assert cfg.train.init_from == str(tmp_path / "runs" / "align")
    assert cfg.data.train == str(tmp_path / "data" / "train.json")
    assert (cfg.model.llm, cfg.model.vision) == ("shipped:lm", "openai/clip-vit-large-patch14-336")
    assert cfg.train.output_dir == "runs/sft"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_example_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train.stage in ("sft", "align", "dpo")
    if name == "demo.yaml":
        assert cfg.model.llm == "shipped:lm"
        assert cfg.data.train == str(REPO / "runs" / "demo" / "data" / "train" / "conversations.json")
    elif name == "hf-example.yaml":
        assert cfg.model.vision_select_layer == -2
    elif name == "smollm2-shapes.yaml":  # the docs' recipe: a fetched LLM, named, not fetched by loading
        assert cfg.model.llm == "models:smollm2-135m" and cfg.train.stage == "align"


def test_architecture_choices_that_cannot_go_together_fail_at_config_time() -> None:
    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(None, list(overrides))
        return str(info.value)

    assert "model.bridge='fuyu' with model.vision='shipped:vision'" in problems("model.bridge=fuyu")
    assert "model.bridge='mlp' with model.vision='patch'" in problems("model.vision=patch")
    msg = problems("model.bridge=resampler", "model.pixel_shuffle=2")
    assert "model.pixel_shuffle=2 regroups tokens for the MLP bridge, but model.bridge='resampler'" in msg
    msg = problems("model.vision=patch", "model.bridge=fuyu", "model.patch_size=5", "model.vision_extra=x")
    assert "model.patch_canvas_height=64 is not a multiple of model.patch_size=5" in msg
    assert "patch sizes that fit: 1, 2, 4, 8, 16, 32, 64" in msg
    assert "cannot be fused with another tower" in msg
    cfg = load_config(None, ["model.vision=patch", "model.bridge=fuyu", "model.bridge=cross-attention",
                             "model.vision=shipped:vision", "model.cross_attention_every=2"])
    assert (cfg.model.bridge, cfg.model.cross_attention_every) == ("cross-attention", 2)
