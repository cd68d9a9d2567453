"""`evaluate(models, EvalConfig(...))`: quality (lm-eval tasks, held-out perplexity), measured speed against the
base model in one alternating run, size and memory — one `Report` for one model or a family.

Evaluation data never overlaps calibration or fine-tuning data (see `zipkd.data.assets`): the tasks read the
evaluation partition and perplexity uses the held-out LAMBADA passages."""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError
from zipkd.evaluate.harness import available_tasks, resolve_tasks
from zipkd.evaluate.report import ModelEval, Report
from zipkd.latency.table import Regime

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "mmlu")
# Quick default: the first 50 documents of each task after the tasks' fixed shuffle (a random sample); the
# whole suite on the embedded model fits in 10 minutes on 2 CPU cores (BENCHMARKS.md). Use limit=None for all.
DEFAULT_LIMIT = 50
AUTO = "auto"


@dataclass
class EvalConfig:
    """What to measure. `base`: "auto" (the first model of the manifest chain), a model spec, or None.
    `regime`: None (the one recorded in the model's manifest, else the defaults on `device`), a `Regime`
    (used as given), or a dict of fields that override the recorded one."""

    tasks: Sequence[str] = DEFAULT_TASKS
    limit: int | float | None = DEFAULT_LIMIT
    batch_size: int = 8
    max_length: int | None = None  # lm-eval context length (None: the model config's)
    device: str = "cpu"  # where tasks and perplexity run
    dtype: str = "float32"
    perplexity: bool = True
    ppl_max_length: int = 512
    ppl_max_tokens: int = 8192
    speed: bool = True
    regime: Regime | dict[str, Any] | None = None
    warmup: int = 2
    repeats: int = 7
    memory: bool = True
    base: str | None = AUTO
    hash_models: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",")]
        self.tasks = tuple(resolve_tasks(self.tasks))
        if self.limit is not None:
            if isinstance(self.limit, bool) or not self.limit > 0:
                raise ZipkdError(f"limit must be positive (a count, or a fraction below 1), got {self.limit}")
            if self.limit >= 1:
                if float(self.limit) != int(self.limit):
                    raise ZipkdError(
                        f"a limit of 1 or more must be a whole number of documents, got {self.limit}"
                    )
                self.limit = int(self.limit)
        if self.batch_size < 1:
            raise ZipkdError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 16:
            raise ZipkdError(f"max length must be at least 16 tokens, got {self.max_length}")
        if self.ppl_max_length < 2 or self.ppl_max_tokens < self.ppl_max_length:
            raise ZipkdError(
                "perplexity needs windows of at least 2 tokens and max tokens ≥ the window length"
            )
        if self.warmup < 0 or self.repeats < 1:
            raise ZipkdError("warmup must be at least 0 and repeats at least 1")
        if isinstance(self.regime, dict):
            unknown = set(self.regime) - set(Regime.__dataclass_fields__)
            if unknown:
                raise ZipkdError(
                    f"unknown regime fields {sorted(unknown)}; known: {', '.join(Regime.__dataclass_fields__)}"
                )
            Regime(**self.regime)  # validates the values
        from zipkd.models.io import DTYPES

        if self.dtype not in DTYPES:
            raise ZipkdError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")


def short_name(spec: str) -> str:
    """A model's display name: the folder name, or the embedded name."""
    return Path(str(spec)).name or str(spec)


def _model_path(spec: str) -> Path:
    from zipkd.models.io import resolve_model

    return resolve_model(spec)


def expand_specs(specs: Sequence[str | os.PathLike]) -> list[str]:
    """Model specs, with a family folder (sub-folders holding models, as `zipkd prune` writes for several
    targets) replaced by its models in name order."""
    out: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            members = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
            if members:
                out.extend(str(p) for p in members)
                continue
        out.append(str(spec))
    return list(dict.fromkeys(out))


def resolve_base(specs: Sequence[str], config: EvalConfig) -> str | None:
    """The base model: given, or (auto) the root of the first model's manifest chain."""
    if config.base is None:
        return None
    if config.base != AUTO:
        _model_path(config.base)  # fail early on a bad spec
        return config.base
    from zipkd.evaluate.lineage import base_model

    roots = {base_model(_model_path(s)) for s in specs}
    roots.discard(None)
    if len(roots) > 1:
        raise ZipkdError(f"the models come from different bases ({', '.join(map(str, roots))}); pass --base")
    return str(roots.pop()) if roots else None


def resolve_regime(specs: Sequence[str], config: EvalConfig) -> tuple[Regime, str]:
    """The regime speed is measured in, and where it came from."""
    if isinstance(config.regime, Regime):
        return config.regime, "given"
    from zipkd.evaluate.lineage import recorded_regime

    found = None
    for s in specs:
        found = recorded_regime(_model_path(s))
        if found is not None:
            break
    regime, source = (
        found if found is not None else (Regime(device=config.device, dtype=config.dtype), "defaults")
    )
    if config.regime:
        regime = Regime(**{**dataclasses.asdict(regime), **config.regime})
        source += " with " + ", ".join(f"{k}={v}" for k, v in config.regime.items()) + " given"
    return regime, source


def _check_device(device: str) -> None:
    import torch

    text = device.strip().lower()
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ZipkdError(f"unknown device {device!r}; choose cpu or cuda (cuda:N)")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise ZipkdError(f"device {device} asked for but no CUDA device is available here; use --device cpu")


def _stage(path: Path) -> str | None:
    from zipkd.manifest import read_manifest

    m = read_manifest(path) if path.is_dir() else None
    return m.get("stage") if m else None


def _quality(spec: str, config: EvalConfig, progress: Any) -> ModelEval:
    """Load one model, score it (tasks, perplexity), record its size; the model is freed afterwards."""
    from zipkd.evaluate.harness import run_tasks
    from zipkd.evaluate.lineage import predicted_speedup
    from zipkd.evaluate.speed import disk_bytes, parameter_count, tensor_bytes
    from zipkd.manifest import content_hash
    from zipkd.models.io import load_model

    path = _model_path(spec)
    lm = load_model(spec, dtype=config.dtype, device=config.device)
    results = run_tasks(
        lm.model,
        lm.tokenizer,
        config.tasks,
        limit=config.limit,
        batch_size=config.batch_size,
        max_length=config.max_length,
        progress=progress,
        label=short_name(spec),
    )
    quality = {
        t: {
            "metric": r.primary,
            "score": r.score,
            "stderr": r.stderr.get(r.primary),
            "n": r.n,
            "metrics": r.metrics,
        }
        for t, r in results.items()
    }
    ppl = None
    if config.perplexity:
        from zipkd.data.assets import heldout_text_path
        from zipkd.data.text import load_texts
        from zipkd.evaluate.perplexity import perplexity

        ppl = perplexity(
            lm.model,
            lm.tokenizer,
            load_texts(heldout_text_path()),
            max_length=config.ppl_max_length,
            max_tokens=config.ppl_max_tokens,
            batch_size=max(1, min(config.batch_size, 4)),
            progress=progress,
        )
    predicted = predicted_speedup(path)
    memory = {
        "params": parameter_count(lm.model),
        "disk_bytes": disk_bytes(path),
        "weights_bytes": tensor_bytes(lm.model),
    }
    del lm
    gc.collect()
    return ModelEval(
        name=short_name(spec),
        path=str(path),
        stage=_stage(path),
        sha256=content_hash(path) if config.hash_models else None,
        quality=quality,
        perplexity=ppl,
        memory=memory,
        predicted_speedup=predicted[0] if predicted else None,
        predicted_from=predicted[1] if predicted else None,
    )


def _speed(
    evals: list[ModelEval], specs: list[str], regime: Regime, config: EvalConfig, progress: Any
) -> None:
    """Load every model in the regime's device and dtype and time them alternately in one run."""
    import torch

    from zipkd.evaluate.speed import measure_speed
    from zipkd.models.io import load_model

    if regime.device.startswith("cuda") and not torch.cuda.is_available():
        raise ZipkdError(
            f"the speed regime is on {regime.device} but no CUDA device is here; pass --device cpu "
            "(or --no-speed)"
        )
    task = progress.add_task("speed (alternating)", total=None) if progress is not None else None
    models = [load_model(s, dtype=regime.dtype, device=regime.device, tokenizer=False).model for s in specs]
    try:
        rows = measure_speed(
            models, regime, warmup=config.warmup, repeats=config.repeats, memory=config.memory
        )
    finally:
        del models
        gc.collect()
    for ev, row in zip(evals, rows, strict=True):
        mem = row.pop("memory", None)
        ev.speed = row
        if mem:
            ev.memory.update(
                {
                    "peak_bytes": mem["peak_bytes"],
                    "activation_bytes": mem["activation_bytes"],
                    "peak_method": mem["method"],
                }
            )
    if task is not None:
        progress.update(task, total=1, completed=1)


def _unique_names(evals: list[ModelEval]) -> None:
    """Folder names label tables and plots; where two coincide, use the longer path tails."""
    names = [e.name for e in evals]
    for e in evals:
        if names.count(e.name) > 1 and e.path:
            e.name = "/".join(Path(e.path).parts[-2:])


def _retention(report: Report) -> None:
    base = report.base
    for m in report.models:
        if base is None:
            continue
        for t in report.tasks:
            b = base.quality[t]["score"]
            m.retention[t] = m.quality[t]["score"] / b if b > 0 else None
        if base.speed and m.speed:
            m.measured_speedup = base.speed["median_ms"] / m.speed["median_ms"]
    if base is not None and base.speed:
        base.measured_speedup = 1.0


# Settings that must match for an earlier report's scores of a model to stand for this run's.
_SCORING_KEYS = (
    "tasks",
    "limit",
    "batch_size",
    "max_length",
    "dtype",
    "perplexity",
    "ppl_max_length",
    "ppl_max_tokens",
)


def reusable_scores(report: Report | None, path: Path, config: EvalConfig) -> ModelEval | None:
    """The scores of the identical model (same content hash) in `report`, if it was scored with the same
    settings; tasks and perplexity are deterministic for a given model, data and settings."""
    if report is None or not config.hash_models:
        return None
    mine = _config_json(config)
    theirs = report.config or {}
    if any(
        (sorted(mine[k]) if k == "tasks" else mine[k])
        != (sorted(theirs.get(k) or []) if k == "tasks" else theirs.get(k))
        for k in _SCORING_KEYS
    ):
        return None
    from zipkd.manifest import content_hash

    sha = content_hash(path)
    for m in report.all_models():
        if m.sha256 == sha and all(t in m.quality for t in config.tasks):
            return m
    return None


def _reuse(found: ModelEval, spec: str, path: Path, source: str) -> ModelEval:
    from zipkd.evaluate.lineage import predicted_speedup

    predicted = predicted_speedup(path)
    memory = {k: found.memory[k] for k in ("params", "disk_bytes", "weights_bytes") if k in found.memory}
    return ModelEval(
        name=short_name(spec),
        path=str(path),
        stage=_stage(path),
        sha256=found.sha256,
        quality=dict(found.quality),
        perplexity=found.perplexity,
        memory=memory,
        predicted_speedup=predicted[0] if predicted else None,
        predicted_from=predicted[1] if predicted else None,
        scored_in=source,
    )


def evaluate(
    model_spec: str | os.PathLike | Sequence[str | os.PathLike],
    config: EvalConfig | None = None,
    progress: Any = None,
    reuse_base: Report | None = None,
) -> Report:
    """Evaluate one model or a family (and their base, for retention and measured speedup) into a Report.

    `reuse_base`: an earlier report (e.g. the CI baseline); if it holds the base model's scores under the same
    settings, they are reused instead of scoring the base again (its speed is always measured in this run)."""
    from zipkd.manifest import hardware_fingerprint, package_versions
    from zipkd.paths import offline_env

    offline_env()
    config = config or EvalConfig()
    specs = expand_specs([model_spec] if isinstance(model_spec, (str, os.PathLike)) else list(model_spec))
    if not specs:
        raise ZipkdError("no model to evaluate")
    _check_device(config.device)
    base_spec = resolve_base(specs, config)
    if base_spec is not None and any(
        _model_path(base_spec).resolve() == _model_path(s).resolve() for s in specs
    ):
        base_spec = None  # evaluating the base itself: nothing to compare with
    regime, regime_source = resolve_regime(specs, config) if config.speed else (None, None)
    evals = [_quality(s, config, progress) for s in specs]
    base = None
    if base_spec is not None:
        found = reusable_scores(reuse_base, _model_path(base_spec), config)
        source = (reuse_base.created or "an earlier report") if reuse_base is not None else ""
        base = (
            _reuse(found, base_spec, _model_path(base_spec), f"report of {source}")
            if found
            else _quality(base_spec, config, progress)
        )
    if config.speed:
        all_specs = ([base_spec] if base else []) + specs
        _speed(([base] if base else []) + evals, all_specs, regime, config, progress)
    _unique_names(([base] if base else []) + evals)
    report = Report(
        tasks=list(config.tasks),
        limit=config.limit,
        models=evals,
        base=base,
        regime=dataclasses.asdict(regime) if regime else None,
        regime_source=regime_source,
        config=_config_json(config),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=package_versions(),
        hardware=hardware_fingerprint(),
    )
    _retention(report)
    return report


def _config_json(config: EvalConfig) -> dict[str, Any]:
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d["tasks"] = list(config.tasks)
    if isinstance(config.regime, Regime):
        d["regime"] = dataclasses.asdict(config.regime)
    return d


__all__ = ["AUTO", "DEFAULT_LIMIT", "DEFAULT_TASKS", "EvalConfig", "Report", "available_tasks", "evaluate"]
