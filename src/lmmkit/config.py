"""Typed, validated run configs: a YAML file plus dotted command-line overrides.

A config has three sections, each optional in the file: ``model`` (which LLM, vision tower and
bridge), ``data`` (which files) and ``train`` (how to train). :func:`load_config` reads the file,
applies ``section.key=value`` overrides (the overrides win), checks every value and raises one
:class:`ConfigError` listing every problem, one per line, each naming where it came from (the
file, or ``command line``) and the dotted key::

    configs/x.yaml: unknown key 'train.lrr'; did you mean 'train.lr'? allowed keys in train: ...
    command line: train.stage: 'algin' is not allowed; choose one of: align, sft, dpo, full

Values are parsed leniently where YAML is surprising: ``lr: 1e-3`` (a *string* to PyYAML) is
read as a number, and an override's text is kept verbatim for string keys (``data.train=2024``).
Files are not checked for existence here; the loaders do that when they open them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from lmmkit.data.mixture_spec import resolve_mixture_paths
from lmmkit.spec_checks import model_problems, packing_problems
from lmmkit.specs import SHIPPED_LM, SHIPPED_VISION, Config, DataSpec, ModelSpec, TrainSpec

__all__ = [
    "SHIPPED_LM",
    "SHIPPED_VISION",
    "Config",
    "ConfigError",
    "DataSpec",
    "ModelSpec",
    "TrainSpec",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """One or more config problems; `errors` holds one message per problem (also the lines of str(e))."""

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


_SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec}
_HINTS: dict[str, dict[str, Any]] = {name: typing.get_type_hints(cls) for name, cls in _SECTIONS.items()}
_FIELDS: dict[str, dict[str, dataclasses.Field]] = {
    name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in _SECTIONS.items()
}
# Input paths: any relative path resolves against the base folder.
_PATH_KEYS = {"data.train", "data.image_folder", "data.eval", "train.init_from"}
# Model paths: may also be hub ids ("org/name"), so only clearly-local relative paths resolve.
_MODEL_PATH_KEYS = {"model.llm", "model.vision", "model.vision_extra"}


class _Invalid(Exception):
    """A single value failed its check; the message follows the dotted key."""


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, list | tuple):
        return "a list"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _optional_inner(hint: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args:
            return next(a for a in args if a is not type(None))
    return None


def _is_str_field(hint: Any) -> bool:
    return hint is str or _optional_inner(hint) is str


def _coerce(hint: Any, value: Any, meta: Mapping[str, Any]) -> Any:
    """Check `value` against a field's type and range; return it converted, or raise _Invalid."""
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else _coerce(inner, value, meta)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f"; did you mean '{close[0]}'?" if close else ""
        raise _Invalid(f"{_show(value)} is not allowed; choose one of: {', '.join(map(str, choices))}{hint_text}")
    bound = meta.get("bound", "")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(f"expected true or false, got {_show(value)}")
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            quote = " (put it in quotes)" if isinstance(value, bool | float) else ""
            raise _Invalid(f"expected a string, got {_show(value)}{quote}")
        if not value.strip():
            raise _Invalid("expected a non-empty string" + (" (use null to unset it)" if meta.get("optional") else ""))
        return value
    noun = {int: "an integer", float: "a number"}[hint]
    expect = meta.get("expect") or (f"{noun} {bound}" if bound else noun)
    converted: int | float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        converted = value
    elif isinstance(value, str):  # PyYAML reads 1e-3 as a string
        try:
            converted = float(value.strip())
        except ValueError:
            converted = None
    if converted is None or not math.isfinite(converted):
        raise _Invalid(f"expected {noun}, got {_show(value)}")
    if hint is int:
        if converted != int(converted):
            raise _Invalid(f"expected {noun}, got {_show(value)}")
        converted = int(converted)
    else:
        converted = float(converted)
    ok = meta.get("ok")
    if ok is not None and not ok(converted):
        raise _Invalid(f"expected {expect}, got {_show(value)}")
    return converted


def _unknown_key(section: str, key: str) -> str:
    allowed = list(_FIELDS[section])
    close = difflib.get_close_matches(key, allowed, n=1)
    elsewhere = [s for s in _SECTIONS if s != section and key in _FIELDS[s]]
    if close:
        hint = f"; did you mean '{section}.{close[0]}'? "
    elif elsewhere:
        hint = f"; did you mean '{elsewhere[0]}.{key}'? "
    else:
        hint = "; "
    return f"unknown key '{section}.{key}'{hint}allowed keys in {section}: {', '.join(allowed)}"


def _unknown_section(name: str) -> str:
    close = difflib.get_close_matches(name, list(_SECTIONS), n=1)
    owner = [s for s in _SECTIONS if name in _FIELDS[s]]
    if close:
        hint = f"; did you mean '{close[0]}'? "
    elif owner:
        hint = f"; did you mean '{owner[0]}.{name}' (keys go inside their section)? "
    else:
        hint = "; "
    return f"unknown section '{name}'{hint}allowed sections: {', '.join(_SECTIONS)}"


class _Raw:
    """Raw values per section, with where each dotted key came from, and the problems found so far."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        self.origins: dict[str, str] = {}
        self.errors: list[str] = []

    def error(self, origin: str, message: str) -> None:
        self.errors.append(f"{origin}: {message}")

    def origin(self, key: str) -> str:
        return self.origins.get(key, self.source)

    def add_mapping(self, data: Any) -> None:
        if data is None:
            return
        if not isinstance(data, Mapping):
            self.error(self.source, f"expected a mapping with sections {', '.join(_SECTIONS)}, got {_show(data)}")
            return
        for section, body in data.items():
            name = str(section)
            if name not in _SECTIONS:
                self.error(self.source, _unknown_section(name))
            elif body is None:
                continue
            elif not isinstance(body, Mapping):
                self.error(self.source, f"section '{name}' must be a mapping of key: value, got {_show(body)}")
            else:
                for key, value in body.items():
                    self.values[name][str(key)] = value
                    self.origins[f"{name}.{key}"] = self.source

    def resolve_paths(self, base: Path, keys: Sequence[str] | None = None) -> None:
        for dotted in _PATH_KEYS | _MODEL_PATH_KEYS:
            if keys is not None and dotted not in keys:
                continue
            section, key = dotted.split(".")
            value = self.values[section].get(key)
            if isinstance(value, str) and value.strip():
                self.values[section][key] = _resolve(value, base, model=dotted in _MODEL_PATH_KEYS)
        mixture = self.values["data"].get("mixture")
        if isinstance(mixture, str) and mixture.strip() and (keys is None or "data.mixture" in keys):
            self.values["data"]["mixture"] = resolve_mixture_paths(mixture, base)

    def add_override(self, text: str, cwd: Path) -> None:
        if "=" not in text:
            self.error(COMMAND_LINE, f"override {text!r} has no '='; write SECTION.KEY=VALUE, e.g. train.lr=3e-4")
            return
        dotted, value_text = (s.strip() for s in text.split("=", 1))
        parts = dotted.split(".")
        if len(parts) != 2 or not all(parts):
            owner = [s for s in _SECTIONS if dotted in _FIELDS[s]]
            hint = f"; did you mean '{owner[0]}.{dotted}'?" if owner else ""
            self.error(COMMAND_LINE, f"override {text!r}: the key must be SECTION.KEY, e.g. train.lr{hint}")
            return
        section, key = parts
        if section not in _SECTIONS:
            self.error(COMMAND_LINE, _unknown_section(section))
            return
        hint = _HINTS[section].get(key)
        value: Any
        if hint is not None and _is_str_field(hint) and not value_text.startswith(("'", '"')):
            # Keep a string key's text as typed ("2024" stays a string); null/~/empty unset optional keys.
            optional = _optional_inner(hint) is not None
            value = None if optional and value_text in ("", "null", "~", "None") else value_text
        else:
            try:
                value = yaml.safe_load(value_text)
            except yaml.YAMLError:
                value = value_text
        self.values[section][key] = value
        self.origins[dotted] = COMMAND_LINE
        self.resolve_paths(cwd, keys=[dotted])

    def build(self) -> Config:
        """Check every value, then the cross-field rules; raise ConfigError listing all problems."""
        specs: dict[str, Any] = {}
        bad: set[str] = set()
        for section, cls in _SECTIONS.items():
            kwargs: dict[str, Any] = {}
            for key, value in self.values[section].items():
                dotted = f"{section}.{key}"
                if key not in _FIELDS[section]:
                    self.error(self.origin(dotted), _unknown_key(section, key))
                    continue
                f = _FIELDS[section][key]
                meta = dict(f.metadata, optional=_optional_inner(_HINTS[section][key]) is not None)
                try:
                    kwargs[key] = _coerce(_HINTS[section][key], value, meta)
                except _Invalid as e:
                    self.error(self.origin(dotted), f"{dotted}: {e}")
                    bad.add(dotted)
            specs[section] = cls(**kwargs)
        cfg = Config(**specs)
        self._cross_check(cfg, bad)
        if self.errors:
            raise ConfigError(self.errors)
        return cfg

    def _cross_check(self, cfg: Config, bad: set[str]) -> None:
        for key, shipped, what in (("llm", SHIPPED_LM, "LM"), ("vision", SHIPPED_VISION, "vision tower")):
            value = getattr(cfg.model, key)
            if f"model.{key}" not in bad and value.startswith("shipped:") and value != shipped:
                self.error(self.origin(f"model.{key}"), f"model.{key}: {value!r} is not a shipped part; the shipped "
                           f"{what} is '{shipped}' (otherwise give an HF folder or hub id)")
        self._check_model(cfg.model, bad)
        for key, message in packing_problems(cfg) if not {"train.packing", "train.stage", "model.llm"} & bad else ():
            self.error(self.origin(key), message)
        t = cfg.train
        self._check_mixture(cfg, bad)
        if {"train.stage", "train.train_vision_tower", "train.cache_vision_features"} & bad:
            return
        if t.lora_rank and t.stage not in ("sft", "dpo") and "train.lora_rank" not in bad:
            self.error(self.origin("train.lora_rank"),
                       f"train.lora_rank: LoRA adapts the LLM in stages sft and dpo, but stage {t.stage!r} "
                       + ("trains only the bridge" if t.stage == "align" else "trains every weight")
                       + "; set train.lora_rank=0 or use stage sft / dpo")
        if t.dpo_reference == "adapters-off" and not t.lora_rank:
            self.error(self.origin("train.dpo_reference"),
                       "train.dpo_reference: 'adapters-off' uses the model with its LoRA adapters switched off as the "
                       "reference, so it needs train.lora_rank > 0; set train.lora_rank (e.g. 16) or use 'copy'")
        if t.stage == "align" and t.train_vision_tower:
            self.error(self.origin("train.train_vision_tower"),
                       "train.train_vision_tower: stage 'align' trains only the bridge, so the tower cannot train; "
                       "use stage 'sft' (with train.train_vision_tower=true) or stage 'full'")
        elif t.trains_vision_tower and t.cache_vision_features:
            if "cache_vision_features" not in self.values["train"]:
                t.cache_vision_features = False  # the default: caching is only for a frozen tower
            else:
                why = ("stage 'full' trains it" if t.stage == "full"
                       else f"stage '{t.stage}' with train.train_vision_tower=true trains it")
                self.error(self.origin("train.cache_vision_features"),
                           "train.cache_vision_features: true needs a frozen vision tower (cached features go stale "
                           f"once the tower changes), but {why}; set train.cache_vision_features=false")

    def _check_mixture(self, cfg: Config, bad: set[str]) -> None:
        """A mixture replaces data.train, streams without end, and has no fixed image list to cache."""
        d, t = cfg.data, cfg.train
        if not d.mixture or {"data.mixture", "train.stage"} & bad:
            return
        if d.train:
            self.error(self.origin("data.mixture"), "data.mixture and data.train are both set: a run trains on one of "
                       "them; unset data.train (a LLaVA file can be one source of the mixture: 'llava:FILE@IMAGES')")
        if t.stage == "dpo":
            self.error(self.origin("data.mixture"), "data.mixture: stage 'dpo' reads a preference file (data.train), "
                       "not a mixture of conversation sources")
        if not t.max_steps and "train.max_steps" not in bad:
            self.error(self.origin("train.max_steps"), "train.max_steps: a data mixture streams without end, so "
                       "give the number of steps (train.max_steps > 0); train.epochs has no meaning for it")
        if t.cache_vision_features:
            if "cache_vision_features" not in self.values["train"]:
                t.cache_vision_features = False  # the default: a stream has no fixed set of images to cache
            else:
                self.error(self.origin("train.cache_vision_features"), "train.cache_vision_features: true needs the "
                           "whole image set up front, but data.mixture streams it; set train.cache_vision_features="
                           "false (the data workers decode and preprocess instead)")

    def _check_model(self, m: ModelSpec, bad: set[str]) -> None:
        """Architecture choices that cannot go together, caught before anything is loaded (spec_checks)."""
        if {"model.bridge", "model.vision", "model.pixel_shuffle", "model.vision_extra", "model.anyres",
            "model.anyres_max"} & bad:
            return
        for key, message in model_problems(m):
            self.error(self.origin(key), message)


def _resolve(value: str, base: Path, model: bool) -> str:
    """Resolve a relative path against `base` (see load_config for the rule)."""
    if model and value.startswith("shipped:"):
        return value
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    if model:
        explicit = value in (".", "..") or value.startswith(("./", "../"))
        if not (explicit or ("/" in value and (base / path).exists())):
            return value  # a hub id such as "openai/clip-vit-large-patch14-336", or a bare name
    return os.path.abspath(base / path)


def config_from_dict(d: Mapping[str, Any] | None, source: str = "<dict>", base: Path | None = None) -> Config:
    """Build and validate a Config from {"model": {...}, "data": {...}, "train": {...}} (each optional).

    `source` names the origin in error messages. With `base`, relative input paths resolve against it by
    load_config's rule (code that trains passes the working directory, so a checkpoint's `init_from`
    chain loads from anywhere, as the CLI's do); without, paths are taken as given.
    """
    raw = _Raw(source)
    raw.add_mapping(d)
    if base is not None:
        raw.resolve_paths(Path(base).absolute())
    return raw.build()


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict of `cfg` (YAML/JSON-safe); `config_from_dict` reads it back unchanged."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or only the defaults when `path` is None), apply `overrides`, validate.

    Overrides are ``section.key=value`` strings (``train.lr=3e-4``, ``data.eval=null``); the value
    is parsed with YAML, except that string keys keep the text as typed. Later overrides win.

    Path rule. Paths written in the YAML file are relative to the file's folder, so a config works
    from any working directory; paths given as overrides are relative to the working directory.
    Both are made absolute ("~" expands). Which keys:

    - ``data.train``, ``data.image_folder``, ``data.eval``, ``train.init_from``: any relative path.
    - ``model.llm``, ``model.vision``: ``shipped:*`` is kept; a relative path resolves when it
      starts with ``./`` or ``../``, or contains ``/`` and exists there; anything else is kept as
      a hub id (``openai/clip-vit-large-patch14-336``, ``gpt2``). Write ``./x`` to force a path.
    - ``train.output_dir`` is never resolved: outputs go relative to the working directory.

    Raises ConfigError naming the file (or "command line") and dotted key of every problem.
    """
    source = str(path) if path is not None else "<defaults>"
    raw = _Raw(source)
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file") from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read the config file ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        raw.add_mapping(data)
        raw.resolve_paths(file.expanduser().absolute().parent)
    cwd = Path.cwd()
    for override in overrides:
        raw.add_override(override, cwd)
    return raw.build()


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write `cfg` as YAML (e.g. beside a checkpoint); `load_config` reads it back.

    Configs from `load_config` hold absolute input paths; a relative one saved here would, on
    reload, resolve against the saved file's folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path
