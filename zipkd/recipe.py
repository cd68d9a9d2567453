"""Recipes: one YAML file naming the model, the hardware regime, and a section per stage.

A stage's section is derived from the stage's config dataclass, the one source of its defaults, types and
checks: its keys are the dataclass fields (those of nested config dataclasses flattened in, e.g. recover's
`steps` is `RecoverConfig.train.steps`), minus the fields the pipeline fills in (seed, regime, device, the
input table); a key left out takes the API default, so `recover: {}` recovers exactly as `zipkd recover` does.
Adding a stage is adding a `StageSchema` to `SCHEMAS` (and its runner to `zipkd.pipeline`).

Validation reports *every* problem at once, each with its line number, before anything runs."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zipkd.errors import ZipkdError
from zipkd.evaluate.api import EvalConfig
from zipkd.export.api import ExportConfig
from zipkd.latency.profile import METHODS as PROFILE_METHODS
from zipkd.latency.table import Regime
from zipkd.paths import read_text_file
from zipkd.prune.api import PruneConfig
from zipkd.quantize.api import QuantizeConfig
from zipkd.recover.api import RecoverConfig


@dataclass
class ProfileConfig:
    """The profile stage: `zipkd.latency.profile.load_or_profile`'s options (a given table, else the cached
    or freshly measured one)."""

    table: str | None = None  # a latency table file (else cached, else profiled)
    method: str | None = None  # blocks | anchored | in-model (None: the device's default)
    repeats: int = 9  # timed repeats per block

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in PROFILE_METHODS:
            raise ZipkdError(f"unknown profiling method {self.method!r}; choose {', '.join(PROFILE_METHODS)}")
        if self.repeats < 1:
            raise ZipkdError("repeats must be at least 1")


@dataclass(frozen=True)
class StageSchema:
    """How a recipe section maps onto a config dataclass."""

    name: str
    config: type
    fixed: tuple[str, ...] = ()  # dotted fields the pipeline fills in (not keys of the section)
    names: dict[str, str] = field(default_factory=dict)  # section key -> dotted field, where flat names clash
    aliases: dict[str, str] = field(default_factory=dict)  # older section keys, still accepted
    retired: dict[str, str] = field(default_factory=dict)  # older section keys no longer accepted -> hint
    optional: bool = False  # off unless the recipe has the section
    off_when_null: str | None = None  # `key: null` turns the stage off

    def keys(self) -> dict[str, str]:
        """Section key -> dotted field path of every settable field."""
        return _flat_keys(self.config, self.fixed, self.names)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flat_keys(cls: type, fixed: Sequence[str] = (), names: dict[str, str] | None = None) -> dict[str, str]:
    names = names or {}
    renamed = {path: key for key, path in names.items()}
    out: dict[str, str] = {}

    def walk(c: type, prefix: str) -> None:
        hints = _hints(c)
        for f in dataclasses.fields(c):
            path = f"{prefix}{f.name}"
            if path in fixed:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{path}.")
                continue
            key = renamed.get(path, f.name)
            if key in out:
                raise ValueError(f"{cls.__name__}: section key {key!r} is both {out[key]} and {path}")
            out[key] = path

    walk(cls, "")
    return out


def _hint_at(cls: type, path: str) -> tuple[Any, dataclasses.Field]:
    parts = path.split(".")
    for part in parts[:-1]:
        cls = _hints(cls)[part]
    f = next(f for f in dataclasses.fields(cls) if f.name == parts[-1])
    return _hints(cls)[parts[-1]], f


def default_of(cls: type, path: str) -> Any:
    """The API default of a dotted field, as the constructed (validated) config holds it."""
    obj = cls()
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _typename(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_typename(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return "list" if origin in (list, tuple, Sequence) else getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's type hint (ints are floats; bools are only bools)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if args == [str] and isinstance(value, str):
            return True  # a comma-separated list
        return isinstance(value, (list, tuple)) and all(any(_matches(v, a) for a in args) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(hint, type) and isinstance(value, hint)


def _choices_text(choices: Sequence[str]) -> str:
    c = list(choices)
    return c[0] if len(c) == 1 else f"{', '.join(c[:-1])} or {c[-1]}"


def build_config(schema: StageSchema, values: dict[str, Any], context: dict[str, Any] | None = None) -> Any:
    """The stage's config from section values (keys as in `schema.keys()`) and the pipeline's fixed fields
    (dotted paths)."""
    keys = schema.keys()
    nested: dict[str, Any] = {}
    for path, v in [*((keys[k], v) for k, v in values.items() if k in keys), *(context or {}).items()]:
        node = nested
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v

    def make(cls: type, kwargs: dict[str, Any]) -> Any:
        hints = _hints(cls)
        return cls(
            **{
                k: make(hints[k], v) if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) else v
                for k, v in kwargs.items()
            }
        )

    return make(schema.config, nested)


SCHEMAS: dict[str, StageSchema] = {
    s.name: s
    for s in (
        StageSchema("profile", ProfileConfig),
        StageSchema("prune", PruneConfig, fixed=("seed", "regime", "table")),
        StageSchema(
            "recover",
            RecoverConfig,
            fixed=("device", "train.seed"),
            names={"gen_batch_size": "rewrite.batch_size"},
            aliases={"examples": "max_examples", "self_distill": "distill"},
            retired={"lora": "write `method: lora` (or `method: full`)"},
        ),
        StageSchema("quantize", QuantizeConfig, fixed=("device",), optional=True, off_when_null="method"),
        StageSchema("export", ExportConfig, optional=True),
        StageSchema(
            "eval",
            EvalConfig,
            fixed=("device", "regime", "base"),
            aliases={"speed_repeats": "repeats"},
        ),
    )
}
STAGES = tuple(SCHEMAS)
HARDWARE = StageSchema("hardware", Regime)
_TOP = {
    "model": (str, "smollm2-135m"),
    "output": (str, None),
    "seed": (int, 0),
    "name": (str, "zipkd-run"),
}


@dataclass
class Recipe:
    model: str
    output: Path
    seed: int
    name: str
    hardware: dict[str, Any]
    sections: dict[
        str, dict[str, Any] | None
    ]  # every key of each stage's section (defaults filled); None = off
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def enabled(self, stage: str) -> bool:
        return self.sections.get(stage) is not None

    def regime(self) -> Regime:
        return build_config(HARDWARE, self.hardware)

    def config(self, stage: str, **context: Any) -> Any:
        """The stage's config dataclass: the section's values plus the pipeline's fixed fields (dotted)."""
        values = self.sections.get(stage)
        if values is None:
            raise ZipkdError(f"stage {stage!r} is disabled in this recipe")
        return build_config(SCHEMAS[stage], values, context)


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Map key paths to 1-based line numbers using PyYAML's node marks."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, str(k.value))
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return lines


def _where_else(schema: StageSchema, key: str) -> str:
    """A hint for an unknown key: what replaced it, or where that name lives in another section."""
    if key in schema.retired:
        return f"; {schema.retired[key]}"
    for other in (HARDWARE, *SCHEMAS.values()):
        if other is not schema and key in other.keys():
            return f"; {key} belongs in the {other.name} section"
    if key in {p.rsplit(".", 1)[-1] for p in schema.fixed}:
        return "; the pipeline sets it (from hardware or the top-level seed)"
    return ""


def parse_recipe(text: str, source: Path | None = None, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe; raise one ZipkdError listing every problem with its line."""
    where = str(source) if source else "recipe"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ZipkdError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ZipkdError(f"{where}: a recipe is a mapping of keys (model, output, prune, ...)")
    lines = _line_map(text)
    problems: list[str] = []

    def err(path: tuple[str, ...], msg: str) -> None:
        line = lines.get(path) or lines.get(path[:1])
        problems.append(
            f"{where}:{line}: {'.'.join(path)}: {msg}" if line else f"{where}: {'.'.join(path)}: {msg}"
        )

    def check(schema: StageSchema, values: Any) -> dict[str, Any]:
        """The section's values (every key, defaults filled), reporting each bad key."""
        keys = schema.keys()
        out = {k: default_of(schema.config, p) for k, p in keys.items()}
        if values is None:
            return out
        if not isinstance(values, dict):
            err((schema.name,), "must be a mapping")
            return out
        ok = True
        for k, v in values.items():
            k = str(k)
            here = (schema.name, k)
            if k == "enabled" and schema.name != "hardware":
                if not isinstance(v, bool):
                    err(here, f"must be bool, got {v!r}")
                    ok = False
                continue
            name = schema.aliases.get(k, k)
            if name not in keys:
                err(here, f"unknown key (expected one of: {', '.join(keys)}){_where_else(schema, k)}")
                ok = False
                continue
            hint, f = _hint_at(schema.config, keys[name])
            if v is None and name == schema.off_when_null:
                out[name] = None
                continue
            if not _matches(v, hint):
                err(here, f"must be {_typename(hint)}, got {v!r}")
                ok = False
                continue
            choices = f.metadata.get("choices")
            msg = f"must be {_choices_text(choices)}" if choices is not None and v not in choices else None
            if msg is None:
                try:  # the dataclass's own checks, one key at a time so the error has the key's line
                    build_config(schema, {name: v})
                except (ZipkdError, TypeError, ValueError) as exc:
                    msg = str(exc)
            if msg:
                err(here, msg)
                ok = False
            else:
                out[name] = v
        if (
            ok
            and values.get("enabled", True) is not False
            and out.get(schema.off_when_null or "", 1) is not None
        ):
            try:  # checks across keys
                build_config(schema, out)
            except (ZipkdError, TypeError, ValueError) as exc:
                err((schema.name,), str(exc))
        return out

    top = {k: data.get(k, spec[1]) for k, spec in _TOP.items()}
    for k in data:
        if k not in _TOP and k not in SCHEMAS and k != "hardware":
            err((str(k),), f"unknown key (expected one of: {', '.join([*_TOP, 'hardware', *SCHEMAS])})")
    for k, (typ, _) in _TOP.items():
        if k in data and not isinstance(data[k], typ):
            err((k,), f"must be {typ.__name__}, got {data[k]!r}")
    if not data.get("output"):
        err(("output",), "missing: the folder where every stage writes its output")
    hardware = check(HARDWARE, data.get("hardware"))
    sections: dict[str, dict[str, Any] | None] = {}
    for stage, schema in SCHEMAS.items():
        given = data.get(stage)
        if given is False or (schema.optional and stage not in data):
            sections[stage] = None
            continue
        values = check(schema, given)
        off = isinstance(given, dict) and given.get("enabled") is False
        if off or (schema.off_when_null and values.get(schema.off_when_null) is None):
            sections[stage] = None
        else:
            sections[stage] = values
    if problems:
        raise ZipkdError(f"{len(problems)} problem(s) in {where}:\n  " + "\n  ".join(problems))
    base_dir = base_dir or (source.parent if source else Path.cwd())
    out = Path(str(top["output"])).expanduser()
    return Recipe(
        model=str(top["model"]),
        output=out if out.is_absolute() else base_dir / out,
        seed=int(top["seed"]),
        name=str(top["name"]),
        hardware=hardware,
        sections=sections,
        source=source,
        raw=data,
    )


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZipkdError(f"recipe {path} not found" if not path.exists() else f"recipe {path} is not a file")
    return parse_recipe(read_text_file(path, "recipe"), source=path, base_dir=Path.cwd())
