"""`zipkd run recipe.yaml`: profile → prune → recover → quantize → eval → export through the same functions as
the individual commands, each built from its recipe section by `Recipe.config` (the stage's config dataclass). Each stage writes its own folder (with its manifest) under the recipe's output; a stage
whose inputs and config are unchanged is skipped on a rerun, an interrupted recovery resumes from its last
checkpoint, and `from_stage` reruns from a stage on."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError
from zipkd.evaluate.api import evaluate
from zipkd.evaluate.report import Report, write_report
from zipkd.export.api import export
from zipkd.latency.profile import load_or_profile
from zipkd.latency.runtimes import runtime_for
from zipkd.latency.table import Regime
from zipkd.manifest import build_manifest, content_hash, set_seed, write_manifest
from zipkd.models.io import load_model, resolve_model
from zipkd.outputs import (
    atomic_dir,
    atomic_write_text,
    check_apart,
    check_writable,
    is_zipkd_output,
    output_lock,
    resolve_path,
)
from zipkd.prune.api import prune_model, save_pruned
from zipkd.quantize.api import quantize
from zipkd.recipe import STAGES, Recipe
from zipkd.recover.api import recover

STATE = "pipeline.json"
FOLDERS = {stage: f"{i}-{stage}" for i, stage in enumerate(STAGES, 1)}


@dataclass
class StageRun:
    stage: str
    folder: Path
    key: str
    skipped: bool
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    recipe: Recipe
    stages: list[StageRun]
    report: Any = None  # zipkd.evaluate.report.Report of the eval stage
    engine_report: Any = None  # the exported GGUF's report in llama.cpp, when there is an export stage

    @property
    def folder(self) -> Path:
        return self.recipe.output


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The package whose code each stage runs; `code_key` follows its references to the rest of zipkd.
STAGE_PACKAGES = {
    "profile": "latency",
    "prune": "prune",
    "recover": "recover",
    "quantize": "quantize",
    "eval": "evaluate",
    "export": "export",
}
# Read by every stage: the runners and the recipe schema that builds their configs (not followed: they refer
# to every stage).
_SHARED_SOURCES = ("__init__.py", "pipeline.py", "recipe.py")
_MODULE_NAME = re.compile(r"zipkd(\.\w+)+")


def _part(module: str) -> str:
    """`zipkd.prune.api` -> `prune` (anything outside zipkd -> "")."""
    parts = module.split(".")
    return parts[1] if parts[0] == "zipkd" and len(parts) > 1 else ""


def _unit(path: Path, root: Path) -> str:
    """The top-level part of zipkd a source file belongs to: a subpackage (`prune`) or a module (`errors`)."""
    first = path.relative_to(root).parts[0]
    return first.removesuffix(".py")


@functools.lru_cache(maxsize=4)
def _source_units(root: Path) -> tuple[dict[str, list[Path]], dict[str, set[str]]]:
    """zipkd's Python sources grouped by top-level part, and the parts each one refers to: its imports
    (absolute, relative, lazy inside functions) and strings that are a zipkd module's name (what a registry
    imports by name)."""
    files: dict[str, list[Path]] = {}
    refs: dict[str, set[str]] = {}
    for f in sorted(root.rglob("*.py")):
        unit = _unit(f, root)
        files.setdefault(unit, []).append(f)
        found = refs.setdefault(unit, set())
        # the package a relative import is resolved against (`zipkd.prune` for zipkd/prune/api.py)
        package = ".".join(("zipkd", *f.relative_to(root).parent.parts))
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found.update(_part(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                found.add(_part(module))
                if module == "zipkd":  # `from zipkd import name`: name is the part
                    found.update(a.name for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _MODULE_NAME.fullmatch(node.value):  # a module a registry imports by name
                    found.add(_part(node.value))
    return files, refs


@functools.lru_cache(maxsize=32)
def code_key(stage: str, root: Path | None = None) -> str:
    """The content of the zipkd source files a stage runs: its package, every part of zipkd that package refers to
    (followed to the end), the runners and the recipe schema. A default that lives in code (a learning rate
    left `None` in a section, the rows of the Fisher pass) changes with it, so another zipkd reruns the stage
    instead of skipping it, and a change to recovery's code does not rerun pruning. Python sources only
    (compiled caches change as they are written). `root`: another copy of the package (tests)."""
    root = root or Path(__file__).resolve().parent
    files, refs = _source_units(root)
    units, todo = set(), [STAGE_PACKAGES[stage]]
    while todo:
        unit = todo.pop()
        if unit in units or unit not in files:
            continue
        units.add(unit)
        todo.extend(refs[unit])
    chosen = {f for u in units for f in files[u]} | {root / name for name in _SHARED_SOURCES}
    h = hashlib.sha256()
    for f in sorted(chosen):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _data_key(recipe: Recipe, stage: str) -> Any:
    """The content of the data files a stage reads where its section leaves them to a library default (prune's
    calibration mix, recover's fine-tuning set and text mix): a changed default or re-exported data is a changed
    stage, not a skipped one."""
    if stage == "prune":
        config = _stage_config(recipe, "prune")
        return [(content_hash(path), w) for path, w in config.calib_sources]
    if stage == "recover":
        config = _stage_config(recipe, "recover")
        mix = config.mix_sources if config.train.mix_ratio > 0 else []
        return {"data": content_hash(config.data_path), "mix": [(content_hash(path), w) for path, w in mix]}
    return None


def _stage_config(recipe: Recipe, stage: str, **extra: Any) -> Any:
    """A stage's config: its recipe section over the library defaults, with what the recipe sets for every
    stage (seed, regime, device). The stage keys and the runners build it the same way."""
    if stage == "prune":
        return recipe.config("prune", seed=recipe.seed, regime=recipe.regime(), **extra)
    if stage == "recover":
        return recipe.config(
            "recover", device=recipe.hardware["device"], **{"train.seed": recipe.seed}, **extra
        )
    return recipe.config(stage, **extra)


def _load_state(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / STATE, json.dumps(state, indent=2) + "\n")


def _profile(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    cfg = recipe.config("profile")
    lm = load_model(recipe.model, dtype=recipe.hardware["dtype"])
    table = load_or_profile(
        lm, recipe.regime(), table=cfg.table, progress=progress, method=cfg.method, repeats=cfg.repeats
    )
    with atomic_dir(folder, force=True) as tmp:
        table.save(tmp / "table.json")
        write_manifest(
            tmp,
            build_manifest(
                "profile",
                {"model": lm.path},
                {"regime": recipe.hardware, **asdict(cfg)},
                recipe.seed,
                {"dense_predicted_ms": table.dense_ms()},
            ),
        )
    return {"table": str(folder / "table.json"), "model": str(lm.path)}


def _prune(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    config = _stage_config(recipe, "prune", table=inputs.get("table"))
    lm = load_model(recipe.model, dtype=recipe.hardware["dtype"])
    results = prune_model(lm, config, progress=progress, table=inputs.get("table"))
    folders = save_pruned(results, lm, folder, config, force=True)
    return {
        "model": str(folders[0]),
        "family": [str(f) for f in folders],
        "predicted_speedup": [r.predicted_speedup for r in results],
    }


def _recover(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    config = _stage_config(recipe, "recover")
    out = recover(inputs["model"], config, out=folder, force=True, progress=progress)
    return {"model": str(out)}


def _quantize(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    config = recipe.config("quantize", device=recipe.hardware["device"])
    quantize(inputs["model"], config, folder, force=True, progress=progress)
    return {"model": str(folder), "unquantized": inputs["model"]}


def _eval(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    """The models in torch against the base (quality, perplexity, speed); when the export stage wrote a GGUF,
    that file too, in llama.cpp against the base exported at the same type (`N-eval/llama.cpp/`)."""
    regime = recipe.regime()
    engine = not runtime_for(regime.runtime).torch
    torch_regime = replace(regime, runtime="eager", quantization=None, threads=None) if engine else regime
    config = recipe.config(
        "eval", device=recipe.hardware["device"], regime=torch_regime, base=str(recipe.model)
    )
    if config.runtime == "llama.cpp":
        raise ZipkdError(
            "the eval stage scores models in torch; llama.cpp scores come from the export stage's GGUF"
        )
    models = list(dict.fromkeys([*inputs.get("family", []), inputs["model"]]))
    with atomic_dir(folder, force=True) as tmp:
        report = evaluate(models, replace(config, runtime="torch"), progress=progress)
        write_report(report, tmp, force=True)
        outputs = {"report": str(folder / "report.json")}
        if inputs.get("gguf"):
            engine_regime = (
                regime if engine else Regime(device="cpu", runtime="llama.cpp", seq_len=regime.seq_len)
            )
            quant = inputs.get("gguf_quantization") or engine_regime.quantization
            engine_config = replace(
                config,
                runtime="llama.cpp",
                quantization=quant,
                threads=engine_regime.threads,
                regime=replace(engine_regime, quantization=quant),
            )
            engine_report = evaluate([inputs["gguf"]], engine_config, progress=progress)
            write_report(engine_report, tmp / "llama.cpp", force=True)
            outputs["engine_report"] = str(folder / "llama.cpp" / "report.json")
    return outputs


def _export(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    """GGUF (or another format) of the last unquantized model: `N-export/model.gguf` with a manifest beside."""
    config = recipe.config("export")
    source = inputs.get("unquantized", inputs["model"])
    lm = load_model(source)
    with atomic_dir(folder, force=True) as tmp:
        result = export(lm, config, tmp / f"model.{config.format}", force=True)
        write_manifest(
            tmp,
            build_manifest(
                "export",
                {"model": source},
                asdict(config),
                recipe.seed,
                {"size_bytes": result.size_bytes},
                {"export": {"arch": result.arch, "quantization": result.quantization}},
            ),
        )
    return {"gguf": str(folder / f"model.{config.format}"), "gguf_quantization": result.quantization}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "profile": _profile,
    "prune": _prune,
    "recover": _recover,
    "quantize": _quantize,
    "eval": _eval,
    "export": _export,
}


def check_run_folder(recipe: Recipe, force: bool = False) -> Path:
    """The recipe's output is a zipkd run folder, an empty or new folder, or (`force`) a folder the user gives
    up; never the model, a folder inside it, or one that cannot be written. Returns the resolved folder."""
    out = resolve_path(recipe.output, "output")
    model_path = resolve_model(recipe.model)
    if out.exists():
        if not out.is_dir():
            raise ZipkdError(f"output {out} exists and is not a folder")
        source = resolve_path(recipe.source, "recipe") if recipe.source is not None else None
        foreign = [p for p in out.iterdir() if not p.name.startswith(".") and p.resolve() != source]
        if foreign and not (out / STATE).is_file() and not force:
            raise ZipkdError(
                f"output {out} holds files that zipkd did not write ({', '.join(sorted(p.name for p in foreign)[:3])}"
                f"{', …' if len(foreign) > 3 else ''}); choose an empty or new folder, or pass --force to let "
                "zipkd write into it (it replaces recipe.yaml)"
            )
        for name in FOLDERS.values():
            if (out / name).is_dir() and not is_zipkd_output(out / name):
                raise ZipkdError(
                    f"{out / name} is a folder that zipkd did not write, where the run writes a stage; zipkd never "
                    "replaces it: move it away or choose another output"
                )
    check_apart(out, (model_path,))
    check_writable(out)
    return out


def run_recipe(
    recipe: Recipe,
    from_stage: str | None = None,
    progress: Any = None,
    on_stage: Callable[[str, str], None] | None = None,
    force: bool = False,
) -> RunSummary:
    """Run every enabled stage of `recipe` in order; skip stages whose key (config + upstream keys) matches
    the recorded one and whose folder exists, unless at or after `from_stage`. The output folder is locked for
    the whole run (a second run of it is refused) and must be zipkd's, new or empty unless `force`."""
    if from_stage is not None and from_stage not in STAGES:
        raise ZipkdError(f"unknown stage {from_stage!r}; stages are {', '.join(STAGES)}")
    if from_stage is not None and not recipe.enabled(from_stage):
        raise ZipkdError(f"stage {from_stage!r} is disabled in this recipe")
    out = check_run_folder(recipe, force)
    with output_lock(out):
        out.mkdir(parents=True, exist_ok=True)
        return _run_stages(recipe, out, from_stage, progress, on_stage)


def _run_stages(
    recipe: Recipe,
    out: Path,
    from_stage: str | None,
    progress: Any,
    on_stage: Callable[[str, str], None] | None,
) -> RunSummary:
    model_path = resolve_model(recipe.model)
    copy = out / "recipe.yaml"
    if recipe.source is not None and resolve_path(recipe.source) != copy:
        atomic_write_text(copy, recipe.source.read_text())
    state = _load_state(out)
    upstream = _key("model", content_hash(model_path), recipe.hardware, recipe.seed)
    inputs: dict[str, Any] = {"model": str(model_path)}
    rerun = False
    runs: list[StageRun] = []
    for stage in STAGES:
        if not recipe.enabled(stage):
            continue
        rerun = rerun or stage == from_stage
        key = _key(
            stage, recipe.sections[stage], _data_key(recipe, stage), upstream, code_key(stage)
        )  # sections: every default
        folder = out / FOLDERS[stage]
        prev = state.get(stage, {})
        if not rerun and prev.get("key") == key and folder.exists() and prev.get("done"):
            runs.append(StageRun(stage, folder, key, skipped=True, outputs=prev.get("outputs", {})))
            if on_stage:
                on_stage(stage, "skipped (unchanged)")
        else:
            rerun = True  # everything downstream of a rerun stage runs again
            if on_stage:
                on_stage(stage, "running")
            set_seed(recipe.seed)
            t0 = time.perf_counter()
            state[stage] = {"key": key, "done": False}
            _save_state(out, state)
            outputs = RUNNERS[stage](recipe, folder, inputs, progress)
            state[stage] = {
                "key": key,
                "done": True,
                "outputs": outputs,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            _save_state(out, state)
            runs.append(
                StageRun(stage, folder, key, skipped=False, seconds=time.perf_counter() - t0, outputs=outputs)
            )
            if on_stage:
                on_stage(stage, f"done in {time.perf_counter() - t0:.0f} s")
        for k, v in runs[-1].outputs.items():
            if k in (
                "model",
                "table",
                "family",
                "report",
                "unquantized",
                "gguf",
                "gguf_quantization",
                "engine_report",
            ):
                inputs[k] = v
        upstream = key
    summary = RunSummary(recipe, runs)
    if "report" in inputs:
        summary.report = Report.load(inputs["report"])
    if "engine_report" in inputs:
        summary.engine_report = Report.load(inputs["engine_report"])
    return summary
