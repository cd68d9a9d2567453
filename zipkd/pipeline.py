"""`zipkd run recipe.yaml`: profile → prune → recover → quantize → eval through the same functions as the
individual commands. Each stage writes its own folder (with its manifest) under the recipe's output; a stage
whose inputs and config are unchanged is skipped on a rerun, an interrupted recovery resumes from its last
checkpoint, and `from_stage` reruns from a stage on."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError
from zipkd.recipe import STAGES, Recipe

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

    @property
    def folder(self) -> Path:
        return self.recipe.output


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_state(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    from zipkd.outputs import atomic_write_text

    atomic_write_text(out / STATE, json.dumps(state, indent=2) + "\n")


def _regime(recipe: Recipe):
    from zipkd.latency.table import Regime

    return Regime(**recipe.hardware)


def _profile(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    from zipkd.latency.profile import load_or_profile
    from zipkd.manifest import build_manifest, write_manifest
    from zipkd.models.io import load_model
    from zipkd.outputs import atomic_dir

    cfg = recipe.sections["profile"] or {}
    lm = load_model(recipe.model, dtype=recipe.hardware["dtype"])
    table = load_or_profile(lm, _regime(recipe), table=cfg.get("table"), progress=progress)
    with atomic_dir(folder, force=True) as tmp:
        table.save(tmp / "table.json")
        write_manifest(
            tmp,
            build_manifest(
                "profile",
                {"model": lm.path},
                {"regime": recipe.hardware, **cfg},
                recipe.seed,
                {"dense_predicted_ms": table.dense_ms()},
            ),
        )
    return {"table": str(folder / "table.json"), "model": str(lm.path)}


def _prune(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    from zipkd.data.text import load_texts
    from zipkd.models.io import load_model
    from zipkd.prune import PruneConfig, prune, save_pruned

    c = dict(recipe.sections["prune"] or {})
    targets = c["target_speedup"] if isinstance(c["target_speedup"], list) else [c["target_speedup"]]
    config = PruneConfig(
        target_speedup=[float(str(t).lower().removesuffix("x")) for t in targets],
        method=c["method"],
        samples=c["samples"],
        calib_len=c["calib_len"],
        damp=float(c["damp"]),
        seed=recipe.seed,
        regime=_regime(recipe),
        table=inputs.get("table"),
    )
    lm = load_model(recipe.model, dtype=recipe.hardware["dtype"])
    texts = load_texts(c["calib"]) if c.get("calib") else None
    results = prune(lm, config, calib_texts=texts, progress=progress, table=inputs.get("table"))
    folders = save_pruned(results, lm, folder, config, force=True, calib_path=c.get("calib"))
    return {
        "model": str(folders[0]),
        "family": [str(f) for f in folders],
        "predicted_speedup": [r.predicted_speedup for r in results],
    }


def _recover(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    from zipkd.recover.api import RecoverConfig, recover
    from zipkd.recover.data import RewriteSettings
    from zipkd.recover.train import TrainConfig

    c = recipe.sections["recover"] or {}
    config = RecoverConfig(
        data=c.get("data"),
        distill=c["self_distill"],
        max_examples=c["examples"],
        rewrite=RewriteSettings(max_new_tokens=c["max_new_tokens"]),
        train=TrainConfig(
            steps=c["steps"],
            batch_size=c["batch_size"],
            lr=c.get("lr"),
            method="lora" if c["lora"] else "full",
            kd=c["kd"],
            kd_weight=float(c["kd_weight"]),
            mix_ratio=float(c["mix_ratio"]),
            max_seq_len=c["max_seq_len"],
            checkpoint_every=c["checkpoint_every"],
            precision=c["precision"],
            seed=recipe.seed,
        ),
        device=recipe.hardware["device"],
    )
    out = recover(inputs["model"], config, out=folder, force=True, progress=progress)
    return {"model": str(out)}


def _quantize(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    from zipkd.quantize.api import quantize

    method = (recipe.sections["quantize"] or {})["method"]
    quantize(inputs["model"], method, folder, force=True, device=recipe.hardware["device"], progress=progress)
    return {"model": str(folder)}


def _eval(recipe: Recipe, folder: Path, inputs: dict[str, Any], progress: Any) -> dict[str, Any]:
    from zipkd.evaluate.api import EvalConfig, evaluate
    from zipkd.evaluate.report import write_report

    c = recipe.sections["eval"] or {}
    tasks = c["tasks"].split(",") if isinstance(c["tasks"], str) else list(c["tasks"])
    config = EvalConfig(
        tasks=tasks,
        limit=c["limit"],
        batch_size=c["batch_size"],
        perplexity=c["perplexity"],
        device=recipe.hardware["device"],
        regime=_regime(recipe),
        repeats=c["speed_repeats"],
        base=str(recipe.model),
    )
    models = list(dict.fromkeys([*inputs.get("family", []), inputs["model"]]))
    report = evaluate(models, config, progress=progress)
    write_report(report, folder, force=True)
    return {"report": str(folder / "report.json")}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "profile": _profile,
    "prune": _prune,
    "recover": _recover,
    "quantize": _quantize,
    "eval": _eval,
}


def run_recipe(
    recipe: Recipe,
    from_stage: str | None = None,
    progress: Any = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RunSummary:
    """Run every enabled stage of `recipe` in order; skip stages whose key (config + upstream keys) matches
    the recorded one and whose folder exists, unless at or after `from_stage`."""
    from zipkd.manifest import content_hash, set_seed
    from zipkd.models.io import resolve_model
    from zipkd.outputs import atomic_write_text

    if from_stage is not None and from_stage not in STAGES:
        raise ZipkdError(f"unknown stage {from_stage!r}; stages are {', '.join(STAGES)}")
    if from_stage is not None and not recipe.enabled(from_stage):
        raise ZipkdError(f"stage {from_stage!r} is disabled in this recipe")
    out = recipe.output
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(recipe.model)
    if recipe.source is not None:
        atomic_write_text(out / "recipe.yaml", recipe.source.read_text())
    state = _load_state(out)
    upstream = _key("model", content_hash(model_path), recipe.hardware, recipe.seed)
    inputs: dict[str, Any] = {"model": str(model_path)}
    rerun = False
    runs: list[StageRun] = []
    for stage in STAGES:
        if not recipe.enabled(stage):
            continue
        rerun = rerun or stage == from_stage
        key = _key(stage, recipe.sections[stage], upstream)
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
            if k in ("model", "table", "family", "report"):
                inputs[k] = v
        upstream = key
    summary = RunSummary(recipe, runs)
    if "report" in inputs:
        from zipkd.evaluate.report import Report

        summary.report = Report.load(inputs["report"])
    return summary
