"""Recipes: one YAML file naming the model, the regime, the targets, recovery, quantization and evaluation.

Validation reports *every* problem at once, each with its line number, before anything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError

STAGES = ("profile", "prune", "recover", "quantize", "eval")

# Schema: key -> (type(s), default, check or None). A check returns an error message or None.
_REGIME = {
    "device": (
        str,
        "cpu",
        lambda v: None if v == "cpu" or v.startswith("cuda") else "must be cpu or cuda[:N]",
    ),
    "regime": (str, "prefill", lambda v: None if v in ("prefill", "decode") else "must be prefill or decode"),
    "batch": (int, 1, lambda v: None if v >= 1 else "must be at least 1"),
    "seq_len": (int, 512, lambda v: None if v >= 1 else "must be at least 1"),
    "context": (int, 512, lambda v: None if v >= 1 else "must be at least 1"),
    "dtype": (
        str,
        "float32",
        lambda v: None if v in ("float32", "bfloat16", "float16") else "must be float32, bfloat16 or float16",
    ),
}


def _speedup_check(v: Any) -> str | None:
    vals = v if isinstance(v, list) else [v]
    for x in vals:
        try:
            s = float(str(x).lower().removesuffix("x"))
        except ValueError:
            return f"{x!r} is not a speedup (write e.g. 2x)"
        if not s >= 1.0:
            return f"speedup {x!r} must be at least 1x"
    return None


_SECTIONS: dict[str, dict[str, tuple]] = {
    "hardware": _REGIME,
    "profile": {"table": ((str, type(None)), None, None)},
    "prune": {
        "target_speedup": ((str, int, float, list), "2x", _speedup_check),
        "method": (
            str,
            "zipkd",
            lambda v: (
                None
                if v in ("zipkd", "magnitude", "shortgpt", "wanda-sp")
                else "must be zipkd, magnitude, shortgpt or wanda-sp"
            ),
        ),
        "samples": (int, 64, lambda v: None if v >= 1 else "must be at least 1"),
        "calib_len": (int, 512, lambda v: None if v >= 16 else "must be at least 16"),
        "calib": ((str, type(None)), None, None),
        "damp": ((int, float), 0.01, lambda v: None if v > 0 else "must be positive"),
    },
    "recover": {
        "enabled": (bool, True, None),
        "data": ((str, type(None)), None, None),
        "examples": (int, 128, lambda v: None if v >= 1 else "must be at least 1"),
        "steps": (int, 60, lambda v: None if v >= 1 else "must be at least 1"),
        "batch_size": (int, 4, lambda v: None if v >= 1 else "must be at least 1"),
        "lr": ((int, float, type(None)), None, lambda v: None if v > 0 else "must be positive"),
        "lora": (bool, False, None),
        "self_distill": (bool, True, None),
        "kd": (
            str,
            "forward",
            lambda v: (
                None
                if v in ("none", "forward", "reverse", "mix")
                else "must be none, forward, reverse or mix"
            ),
        ),
        "kd_weight": ((int, float), 0.5, lambda v: None if 0 <= v <= 1 else "must be between 0 and 1"),
        "mix_ratio": ((int, float), 0.0, lambda v: None if 0 <= v <= 1 else "must be between 0 and 1"),
        "max_seq_len": (int, 256, lambda v: None if v >= 16 else "must be at least 16"),
        "max_new_tokens": (int, 96, lambda v: None if v >= 1 else "must be at least 1"),
        "checkpoint_every": (int, 20, lambda v: None if v >= 1 else "must be at least 1"),
        "precision": (
            str,
            "auto",
            lambda v: None if v in ("auto", "fp32", "bf16") else "must be auto, fp32 or bf16",
        ),
    },
    "quantize": {"method": ((str, type(None)), None, None)},
    "eval": {
        "tasks": ((list, str), ["arc_easy", "piqa"], None),
        "limit": ((int, type(None)), 100, lambda v: None if v is None or v >= 1 else "must be at least 1"),
        "batch_size": (int, 8, lambda v: None if v >= 1 else "must be at least 1"),
        "perplexity": (bool, True, None),
        "speed_repeats": (int, 7, lambda v: None if v >= 1 else "must be at least 1"),
    },
}
_TOP = {
    "model": (str, "smollm2-135m", None),
    "output": (str, None, None),
    "seed": (int, 0, None),
    "name": (str, "zipkd-run", None),
}


@dataclass
class Recipe:
    model: str
    output: Path
    seed: int
    name: str
    hardware: dict[str, Any]
    sections: dict[str, dict[str, Any] | None]  # None = stage skipped
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def enabled(self, stage: str) -> bool:
        return self.sections.get(stage) is not None


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Map key paths to 1-based line numbers using PyYAML's node marks."""
    import yaml

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


def _typename(t: Any) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)


def parse_recipe(text: str, source: Path | None = None, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe; raise one ZipkdError listing every problem with its line."""
    import yaml

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

    def check(section: dict[str, tuple], values: Any, path: tuple[str, ...]) -> dict[str, Any]:
        out = {k: spec[1] for k, spec in section.items()}
        if values is None:
            return out
        if not isinstance(values, dict):
            err(path, "must be a mapping")
            return out
        for k, v in values.items():
            if k not in section:
                err((*path, str(k)), f"unknown key (expected one of: {', '.join(section)})")
                continue
            types, _, validator = section[k]
            ok_types = types if isinstance(types, tuple) else (types,)
            if isinstance(v, bool) and bool not in ok_types:
                ok = False
            else:
                ok = isinstance(v, ok_types) or (float in ok_types and isinstance(v, int))
            if not ok:
                err((*path, k), f"must be {_typename(types)}, got {v!r}")
                continue
            msg = validator(v) if validator and v is not None else None
            if msg:
                err((*path, k), msg)
            else:
                out[k] = v
        return out

    top = {k: data.get(k, spec[1]) for k, spec in _TOP.items()}
    for k in data:
        if k not in _TOP and k not in _SECTIONS:
            err((str(k),), f"unknown key (expected one of: {', '.join([*_TOP, *_SECTIONS])})")
    for k, (types, _, _) in _TOP.items():
        if k in data and not isinstance(data[k], types):
            err((k,), f"must be {_typename(types)}, got {data[k]!r}")
    if not data.get("output"):
        err(("output",), "missing: the folder where every stage writes its output")
    sections: dict[str, dict[str, Any] | None] = {}
    hardware = check(_SECTIONS["hardware"], data.get("hardware"), ("hardware",))
    for stage in STAGES:
        if stage in data and data[stage] is False:
            sections[stage] = None
            continue
        sections[stage] = check(_SECTIONS[stage], data.get(stage), (stage,))
    if sections.get("recover") is not None and not sections["recover"].get("enabled", True):
        sections["recover"] = None
    if sections.get("quantize") is not None and not sections["quantize"].get("method"):
        sections["quantize"] = None
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
        raise ZipkdError(f"recipe {path} not found")
    return parse_recipe(path.read_text(), source=path, base_dir=Path.cwd())
