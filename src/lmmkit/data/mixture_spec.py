"""What a data mixture is: several sources, each with a weight, and the seed that orders the draws.

A mixture is written inline (one config value or command-line argument)::

    0.7*wds:/data/cc3m/{00000..00331}.tar;0.3*llava:/data/llava_v1_5_mix665k.json@/data/images
    cc3m=0.7*wds:/data/cc3m/{00000..00331}.tar;instruct=0.3*llava:mix665k.json@/data/images

or as a YAML / JSON file (relative paths in the specs resolve against the file's folder)::

    sources:
      - {name: cc3m, source: "wds:/data/cc3m/{00000..00331}.tar#seed=3", weight: 0.7}
      - {name: instruct, source: "llava:llava_v1_5_mix665k.json@images", weight: 0.3}

Each source is a source spec (`lmmkit.data.sources`); weights are relative (they need not sum to 1);
names default to KIND-POSITION. The seed is a run setting, not part of the file. `MixtureSpec.problems()`
lists every problem at once, each naming the source by position and name.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmmkit.data.shards import PATTERN_SEPARATOR, is_url
from lmmkit.data.sources import KINDS, SourceSpec, SourceSpecError, parse_source

SOURCE_KEYS: tuple[str, ...] = ("source", "weight", "name")
FILE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")
_INLINE = re.compile(r"^\s*(?:(?P<name>[A-Za-z0-9_.-]+)=)?(?P<weight>[^*:=;]+)\*(?P<spec>.+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class MixtureError(ValueError):
    """One or more problems with a mixture; `errors` holds one line per problem."""

    def __init__(self, errors: str | list[str], where: str = "mixture") -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__(f"{where}: " + self.errors[0] if len(self.errors) == 1
                         else f"{where}: {len(self.errors)} problems:\n" + "\n".join(f"  {e}" for e in self.errors))


@dataclass(frozen=True)
class MixtureSource:
    source: str  # a source spec: KIND:PATH[@ROOT][#KEY=VALUE,...]
    weight: float = 1.0  # relative: the chance a draw takes this source is weight / sum of weights
    name: str = ""  # how states, counts and errors name it; default KIND-POSITION

    @property
    def spec(self) -> SourceSpec:
        return parse_source(self.source)


@dataclass(frozen=True)
class MixtureSpec:
    sources: tuple[MixtureSource, ...] = field(default_factory=tuple)
    seed: int = 0

    def problems(self) -> list[str]:
        out: list[str] = []
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            out.append(f"seed must be an integer, got {self.seed!r}")
        if not self.sources:
            out.append("no sources: give at least one source with a weight")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.sources, start=1):
            label = f"source {i}" + (f" ({s.name})" if s.name else "")
            try:
                s.spec  # noqa: B018 (parsing is the check)
            except (SourceSpecError, ValueError) as e:
                first, _, more = str(e).partition("\n")
                out.append(f"{label}: {first} {', '.join(KINDS)}" if more else f"{label}: {first}")
            w = s.weight
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
                out.append(f"{label}: weight must be a number > 0, got {w!r}")
            if not s.name or not _NAME.match(s.name):
                out.append(f"{label}: name {s.name!r} must be letters, digits, '_', '.' or '-'")
            elif s.name in seen:
                out.append(f"{label}: name {s.name!r} is already used by source {seen[s.name]}; names must be unique")
            else:
                seen[s.name] = i
        return out

    def validate(self, where: str = "mixture") -> MixtureSpec:
        problems = self.problems()
        if problems:
            raise MixtureError(problems, where)
        return self

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def probabilities(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]

    def identity(self) -> list[list[Any]]:
        """What a saved state must match: names, specs and weights, in order."""
        return [[s.name, s.source, float(s.weight)] for s in self.sources]

    def __str__(self) -> str:
        return ";".join(f"{s.name}={s.weight:g}*{s.source}" for s in self.sources)


def _named(sources: list[MixtureSource]) -> tuple[MixtureSource, ...]:
    """Sources without a name get KIND-POSITION (kind "?" when the spec does not parse: validate says why)."""
    out = []
    for i, s in enumerate(sources, start=1):
        if not s.name:
            kind = s.source.partition(":")[0] if isinstance(s.source, str) else "?"
            s = MixtureSource(s.source, s.weight, f"{kind if _NAME.match(kind or '-') else 'source'}-{i}")
        out.append(s)
    return tuple(out)


def _resolve_spec(text: str, base: Path) -> str:
    """A source spec whose relative local paths (data and image roots) are made absolute under `base`."""
    try:
        spec = parse_source(text)
    except SourceSpecError:
        return text  # validate() reports it

    def fix(p: str) -> str:
        if is_url(p) or Path(p).expanduser().is_absolute():
            return p
        return str(base / p)

    path = PATTERN_SEPARATOR.join(fix(p) for p in spec.path.split(PATTERN_SEPARATOR)) if spec.kind == "wds" \
        else fix(spec.path)
    return str(SourceSpec(spec.kind, path, tuple(fix(r) for r in spec.roots), dict(spec.options)))


def parse_inline(text: str, seed: int = 0) -> MixtureSpec:
    """`[NAME=]WEIGHT*SPEC;...` (a part without `WEIGHT*` has weight 1) -> a validated MixtureSpec."""
    sources, errors = [], []
    for i, part in enumerate((p for p in text.split(";") if p.strip()), start=1):
        m = _INLINE.match(part)
        if m is None:
            sources.append(MixtureSource(part.strip(), 1.0))
            continue
        try:
            weight: Any = float(m.group("weight"))
        except ValueError:
            errors.append(f"source {i}: weight {m.group('weight').strip()!r} is not a number "
                          "(write [NAME=]WEIGHT*KIND:PATH, e.g. cc3m=0.7*wds:/data/{0000..0099}.tar)")
            weight = 1.0
        sources.append(MixtureSource(m.group("spec").strip(), weight, m.group("name") or ""))
    if errors:
        raise MixtureError(errors, f"mixture {text!r}")
    return MixtureSpec(_named(sources), seed).validate(f"mixture {text!r}")


def _from_mapping(item: Any, i: int, where: str, base: Path, errors: list[str]) -> MixtureSource | None:
    if isinstance(item, str):
        return MixtureSource(_resolve_spec(item, base), 1.0)
    if not isinstance(item, dict):
        errors.append(f"source {i}: expected a mapping with source, weight, name; got {type(item).__name__}")
        return None
    for key in item:
        if key not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append(f"source {i}: unknown key {key!r}{hint} (allowed: {', '.join(SOURCE_KEYS)})")
    source = item.get("source")
    if not isinstance(source, str) or not source.strip():
        errors.append(f"source {i}: 'source' must be a source spec string such as 'wds:/data/{{0000..0099}}.tar'")
        return None
    name = item.get("name", "")
    return MixtureSource(_resolve_spec(source.strip(), base), item.get("weight", 1.0),
                         str(name) if name is not None else "")


def load_mixture_file(path: str | Path, seed: int = 0) -> MixtureSpec:
    """A YAML or JSON mixture file (see the module docstring) -> a validated MixtureSpec."""
    path = Path(path).expanduser()
    where = f"mixture file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MixtureError(f"cannot read it: {e.strerror or e}", where) from e
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (ValueError, Exception) as e:  # json.JSONDecodeError, yaml.YAMLError
        raise MixtureError(f"not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}", where) from e
    if isinstance(data, dict):
        extra = [k for k in data if k != "sources"]
        if extra:
            hint = " (the seed is a run setting: data.mixture_seed or --seed)" if "seed" in extra else ""
            raise MixtureError(f"unknown top-level key(s) {', '.join(map(repr, extra))}; expected only 'sources'{hint}",
                               where)
        data = data.get("sources")
    if not isinstance(data, list):
        raise MixtureError("expected 'sources:' with a list of {source, weight, name} entries", where)
    errors: list[str] = []
    items = [_from_mapping(item, i, where, path.parent.resolve(), errors) for i, item in enumerate(data, start=1)]
    if any(s is None for s in items):
        raise MixtureError(errors, where)
    spec = MixtureSpec(_named(items), seed)
    problems = errors + spec.problems()  # every problem at once, numbered as in the file
    if problems:
        raise MixtureError(sorted(problems, key=lambda e: int(re.match(r"source (\d+)", e).group(1))), where)
    return spec


def is_mixture_file(text: str) -> bool:
    """A mixture file name (.yaml, .yml, .json, with no KIND: in front), not an inline mixture."""
    return text.strip().lower().endswith(FILE_SUFFIXES) and ":" not in text.split("/")[0]


def parse_mixture(text: str | Path, seed: int = 0) -> MixtureSpec:
    """A mixture file (.yaml, .yml, .json) or an inline mixture -> a validated MixtureSpec."""
    text = str(text)
    if is_mixture_file(text):
        return load_mixture_file(text, seed)
    return parse_inline(text, seed)


def resolve_mixture_paths(text: str, base: str | Path) -> str:
    """A config value with its relative paths made absolute under `base` (the config file's folder): a
    mixture file's own path, or every data path and image root of an inline mixture."""
    base = Path(base)
    if is_mixture_file(text):
        path = Path(text.strip()).expanduser()
        return str(path if path.is_absolute() else base / path)
    parts = []
    for part in (p for p in text.split(";") if p.strip()):
        m = _INLINE.match(part)
        if m is None:
            parts.append(_resolve_spec(part.strip(), base))
        else:
            name = f"{m.group('name')}=" if m.group("name") else ""
            parts.append(f"{name}{m.group('weight').strip()}*{_resolve_spec(m.group('spec').strip(), base)}")
    return ";".join(parts)
