"""`evaluate(models, EvalConfig(...))`: quality (lm-eval tasks, held-out perplexity), measured speed against the
base model in one alternating run, size and memory — one `Report` for one model or a family.

Two runtimes: torch (the default for model folders) and llama.cpp (the default for .gguf files; a model folder
with `EvalConfig(runtime="llama.cpp", quantization="q8_0")` is exported to a temporary GGUF first). In llama.cpp the
same lm-eval tasks are scored through `zipkd.evaluate.llamacpp_lm.LlamaCppLM`, perplexity on the same token
windows as in torch, and speed (prefill and decode) against the base model as a GGUF at the same quantization.

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
from zipkd.manifest import hardware_fingerprint, package_versions

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "mmlu")
# Quick default: the first 50 documents of each task after the tasks' fixed shuffle (a random sample); the
# whole suite on the embedded model fits in 10 minutes on 2 CPU cores (BENCHMARKS.md). Use limit=None for all.
DEFAULT_LIMIT = 50
AUTO = "auto"
RUNTIMES = ("torch", "llama.cpp")
DEFAULT_GGUF_TYPE = "q8_0"  # llama.cpp evaluation of a model folder: exported at this type by default
LLAMACPP_CONTEXT = 128  # llama.cpp decode speed: tokens of prompt before the timed tokens (default)


@dataclass
class EvalConfig:
    """What to measure. `base`: "auto" (the first model of the manifest chain), a model spec, or None.
    `regime`: None (the one recorded in the model's manifest, else the defaults on `device`), a `Regime`
    (used as given), or a dict of fields that override the recorded one.
    `runtime`: "auto" (llama.cpp when a model is a .gguf file, else torch), "torch" or "llama.cpp".
    `quantization` (llama.cpp only): the GGUF type model folders (and the base) are exported at; None: the type
    of the .gguf input, else q8_0. `threads` (llama.cpp only): None = all cores."""

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
    runtime: str = AUTO
    quantization: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.runtime not in (AUTO, *RUNTIMES):
            raise ZipkdError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if self.quantization is not None:
            self.quantization = gguf_type(self.quantization)
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ZipkdError(f"threads must be at least 1, got {self.threads}")
        if self.runtime == "torch" and (self.quantization is not None or self.threads is not None):
            raise ZipkdError(
                "--quantization and --threads apply to --runtime llama.cpp; in torch, quantize the model with "
                "`zipkd quantize` and evaluate that folder"
            )
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


def gguf_type(name: str) -> str:
    """A GGUF type for llama.cpp (q8_0, q4_k_m, f32, …); a torch quantization method gets its own message."""
    from zipkd.quantize.api import canonical_method
    from zipkd.runtimes.llamacpp import FTYPES

    text = str(name).strip().lower()
    if text in FTYPES or text in _llama_file_types():
        return text  # the ones zipkd writes, or another type llama.cpp reads (a .gguf given may hold q4_1)
    try:
        method = canonical_method(text)
    except ZipkdError:
        method = None
    if method is not None:
        raise ZipkdError(
            f"{name} is a torch quantization (`zipkd quantize --method {method}`), which llama.cpp does not run; "
            f"llama.cpp runs the GGUF types {', '.join(FTYPES)}"
        )
    raise ZipkdError(f"unknown GGUF quantization {name!r}; choose one of {', '.join(FTYPES)}")


def _llama_file_types() -> set[str]:
    from gguf.constants import LlamaFileType

    return {t.name.lower().removeprefix("mostly_").removeprefix("all_") for t in LlamaFileType} - {"guessed"}


def short_name(spec: str) -> str:
    """A model's display name: the folder name, or the embedded name."""
    return Path(str(spec)).name or str(spec)


def _model_path(spec: str) -> Path:
    from zipkd.models.io import resolve_model

    return resolve_model(spec)


def expand_specs(specs: Sequence[str | os.PathLike]) -> list[str]:
    """Model specs, with a family folder (sub-folders holding models, as `zipkd prune` writes for several
    targets, or .gguf files) replaced by its models in name order."""
    out: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            members = sorted(
                p
                for p in path.iterdir()
                if (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".gguf")
            )
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


def _quality_dict(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A report's `quality`: per task the primary score and lm-eval's metrics, and (for the paired gate) the
    documents scored and "1"/"0" per document, right or wrong by the primary metric."""
    out = {}
    for t, r in results.items():
        out[t] = {
            "metric": r.primary,
            "score": r.score,
            "stderr": r.stderr.get(r.primary),
            "n": r.n,
            "metrics": r.metrics,
        }
        if r.doc_ids is not None:
            out[t].update(doc_ids=r.doc_ids, correct=r.correct, docs_sha256=r.docs_sha256)
    return out


def _heldout_texts() -> list[str]:
    from zipkd.data.assets import heldout_text_path
    from zipkd.data.text import load_texts

    return load_texts(heldout_text_path())


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
    quality = _quality_dict(results)
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
            for name, row in (m.speed.get("regimes") or {}).items():
                ref = (base.speed.get("regimes") or {}).get(name)
                if ref:
                    row["speedup"] = ref["median_ms"] / row["median_ms"]
    if base is not None and base.speed:
        base.measured_speedup = 1.0
        for row in (base.speed.get("regimes") or {}).values():
            row["speedup"] = 1.0


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
    "runtime",
    "quantization",
)
# What a report written before a key existed had (reports before llama.cpp were all torch, unquantized).
_SCORING_DEFAULTS = {"runtime": "torch", "quantization": None}


def reusable_scores(report: Report | None, path: Path, config: EvalConfig) -> ModelEval | None:
    """The scores of the identical model (same content hash) in `report`, if it was scored with the same
    settings; tasks and perplexity are deterministic for a given model, data and settings."""
    if report is None or not config.hash_models:
        return None
    mine = _config_json(config)
    theirs = report.config or {}
    if any(
        (sorted(mine[k]) if k == "tasks" else mine[k])
        != (sorted(theirs.get(k) or []) if k == "tasks" else theirs.get(k, _SCORING_DEFAULTS.get(k)))
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
        engine=found.engine,
    )


def _specs(model_spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    specs = expand_specs([model_spec] if isinstance(model_spec, (str, os.PathLike)) else list(model_spec))
    if not specs:
        raise ZipkdError("no model to evaluate")
    return specs


def _torch_base(specs: list[str], config: EvalConfig) -> str | None:
    """The base model in torch: `resolve_base`, unless it is one of the models (nothing to compare with)."""
    base_spec = resolve_base(specs, config)
    if base_spec is not None and any(
        _model_path(base_spec).resolve() == _model_path(s).resolve() for s in specs
    ):
        return None
    return base_spec


def base_for(
    model_spec: str | os.PathLike | Sequence[str | os.PathLike], config: EvalConfig | None = None
) -> str | None:
    """The base model `evaluate` would compare the models with (retention, measured speedup), or None; found
    from the arguments, manifests and GGUF headers only, so a caller can refuse what needs a base before any
    work."""
    config = config or EvalConfig()
    specs = _specs(model_spec)
    if resolve_runtime(specs, config) == "llama.cpp":
        base = _llamacpp_base([_engine_model(s) for s in specs], config)
        return None if base is None else base.spec
    return _torch_base(specs, config)


def evaluate(
    model_spec: str | os.PathLike | Sequence[str | os.PathLike],
    config: EvalConfig | None = None,
    progress: Any = None,
    reuse_base: Report | None = None,
) -> Report:
    """Evaluate one model or a family (and their base, for retention and measured speedup) into a Report.

    `reuse_base`: an earlier report (e.g. the CI baseline); if it holds the base model's scores under the same
    settings, they are reused instead of scoring the base again (its speed is always measured in this run)."""
    from zipkd.paths import offline_env

    offline_env()
    config = config or EvalConfig()
    specs = _specs(model_spec)
    if resolve_runtime(specs, config) == "llama.cpp":
        return _evaluate_llamacpp(specs, config, progress, reuse_base)
    if config.quantization is not None or config.threads is not None:
        raise ZipkdError(
            "--quantization and --threads apply to --runtime llama.cpp (the models here run in torch); "
            "pass --runtime llama.cpp"
        )
    config = dataclasses.replace(config, runtime="torch")
    _check_device(config.device)
    base_spec = _torch_base(specs, config)
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
    return _report(evals, base, regime, regime_source, config)


# ---------------------------------------------------------------- llama.cpp


@dataclass
class _EngineModel:
    """One model as llama.cpp runs it: the .gguf given, or a model folder exported to a temporary GGUF."""

    spec: str
    path: Path  # what was given: the .gguf file or the model folder
    # the model folder: itself, or the folder a zipkd-exported .gguf came from (if it is still there)
    source: Path | None
    manifest: dict[str, Any] | None = None
    gguf: Path | None = None  # the file llama.cpp opens (None until a folder is exported)
    quantization: str | None = None  # its GGUF type
    tokenizer: Any = None
    tokenizer_from: str | None = None

    @property
    def exported(self) -> bool:
        return self.gguf is not None and self.gguf != self.path


def _engine_model(spec: str) -> _EngineModel:
    """Cheap checks of a model for llama.cpp, before any work: a .gguf's header (corrupt, truncated), a folder that
    zipkd quantized in torch (llama.cpp cannot run it)."""
    import json

    from zipkd.evaluate.lineage import parent_model
    from zipkd.export.api import MANIFEST_KEY
    from zipkd.runtimes.llamacpp import gguf_header

    path = _model_path(spec)
    if path.suffix == ".gguf":
        header = gguf_header(path)
        try:
            manifest = (
                json.loads(header["fields"][MANIFEST_KEY]) if MANIFEST_KEY in header["fields"] else None
            )
        except json.JSONDecodeError:
            manifest = None
        source = parent_model(manifest) if isinstance(manifest, dict) else None
        return _EngineModel(str(spec), path, source, manifest, gguf=path, quantization=header["file_type"])
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ZipkdError(f"cannot read {path / 'config.json'}: {exc}") from None
    recipe = cfg.get("zipkd_quantization")
    if recipe:
        from zipkd.manifest import read_manifest

        before = parent_model(read_manifest(path) or {})
        method = recipe.get("method") if isinstance(recipe, dict) else recipe
        raise ZipkdError(
            f"{path} was quantized in torch ({method}), which llama.cpp cannot run; export the unquantized "
            f"model instead: zipkd eval {before or 'MODEL'} --runtime llama.cpp --quantization q8_0"
        )
    return _EngineModel(str(spec), path, path)


def _llamacpp_base(models: list[_EngineModel], config: EvalConfig) -> _EngineModel | None:
    """The base model: given, or (auto) the root of the manifest chain of the models' folders (for a .gguf, of
    the folder it was exported from)."""
    if config.base is None:
        return None
    if config.base != AUTO:
        base = _engine_model(config.base)
    else:
        from zipkd.evaluate.lineage import base_model

        roots = {base_model(m.source) for m in models if m.source is not None}
        roots.discard(None)
        if len(roots) > 1:
            raise ZipkdError(
                f"the models come from different bases ({', '.join(map(str, roots))}); pass --base"
            )
        if not roots:
            return None
        base = _engine_model(str(roots.pop()))
    if any(base.path.resolve() == m.path.resolve() for m in models):
        return None  # evaluating the base itself: nothing to compare with
    return base


def _llamacpp_regime(
    models: list[_EngineModel], config: EvalConfig, threads: int
) -> tuple[Regime, str, str | None]:
    """The llama.cpp regime (prefill and decode are both timed; `regime.regime` is the one measured speedup
    and the gate use), where it came from, and the GGUF type it records (None: not recorded)."""
    from zipkd.evaluate.lineage import recorded_regime

    recorded = None
    if isinstance(config.regime, Regime):
        regime, source = config.regime, "given"
        recorded = regime.quantization
    else:
        found = None
        for m in models:
            rec = recorded_regime(m.source) if m.source is not None else None
            if rec is not None and rec[0].runtime == "llama.cpp":
                found = rec
                break
        if found is not None:
            (regime, source), recorded = found, found[0].quantization
        else:
            regime, source = (
                Regime(device="cpu", context=LLAMACPP_CONTEXT, runtime="llama.cpp"),
                "llama.cpp defaults",
            )
        if config.regime:
            regime = Regime(**{**dataclasses.asdict(regime), **config.regime})
            source += " with " + ", ".join(f"{k}={v}" for k, v in config.regime.items()) + " given"
            recorded = config.regime.get("quantization", recorded)
    if str(regime.device).split(":")[0] != "cpu":
        raise ZipkdError("llama.cpp runs on the CPU here; use --device cpu")
    if regime.batch != 1:
        raise ZipkdError("llama.cpp speed is timed for one sequence; use --batch 1")
    return dataclasses.replace(regime, device="cpu", runtime="llama.cpp", threads=threads), source, recorded


def _materialize(m: _EngineModel, quantization: str, threads: int, tmp: Path, progress: Any) -> None:
    """Make `m` runnable: export a folder to a GGUF at `quantization` in `tmp`; find the tokenizer."""
    if m.gguf is None:
        from zipkd.export.api import ExportConfig, export
        from zipkd.models.io import load_model
        from zipkd.runtimes.llamacpp import FTYPES

        if quantization not in FTYPES:
            raise ZipkdError(
                f"cannot export {m.path} at {quantization} (zipkd writes {', '.join(FTYPES)}); "
                "pass --quantization"
            )
        label = f"export {short_name(m.spec)} to GGUF {quantization}"
        task = progress.add_task(label, total=None) if progress is not None else None
        lm = load_model(m.spec)
        out = tmp / f"{len(list(tmp.iterdir()))}-{short_name(m.spec)}-{quantization}.gguf"
        export(lm, ExportConfig(quantization=quantization, threads=threads), out)
        m.gguf, m.quantization = out, quantization
        m.tokenizer, m.tokenizer_from = lm.tokenizer, f"{m.path}"
        del lm
        gc.collect()
        if task is not None:
            progress.update(task, total=1, completed=1)
    elif m.tokenizer is None:
        from zipkd.evaluate.llamacpp_lm import hf_tokenizer

        m.tokenizer, m.tokenizer_from = hf_tokenizer(m.gguf, m.source)


def _engine_info(m: _EngineModel, threads: int) -> dict[str, Any]:
    return {
        "runtime": "llama.cpp",
        "quantization": m.quantization,
        "threads": threads,
        "gguf": None if m.exported else str(m.gguf),
        "exported_from": str(m.path) if m.exported else None,
        "tokenizer": m.tokenizer_from,
    }


def _quality_llamacpp(m: _EngineModel, config: EvalConfig, threads: int, progress: Any) -> ModelEval:
    """Score one GGUF in llama.cpp: the lm-eval tasks and held-out perplexity (the torch windows), and its size."""
    from zipkd.evaluate.harness import evaluate_lm
    from zipkd.evaluate.lineage import predicted_speedup
    from zipkd.evaluate.llamacpp_lm import LlamaCppLM
    from zipkd.manifest import content_hash
    from zipkd.runtimes.llamacpp import gguf_header

    header = gguf_header(m.gguf)
    ppl = None
    with LlamaCppLM(m.gguf, m.tokenizer, max_length=config.max_length, threads=threads) as lm:
        if config.perplexity:
            ppl = lm.perplexity(
                _heldout_texts(), config.ppl_max_length, config.ppl_max_tokens, progress=progress
            )
        results = evaluate_lm(
            lm, config.tasks, limit=config.limit, progress=progress, label=short_name(m.spec)
        )
    predicted = predicted_speedup(m.source) if m.source is not None else None
    return ModelEval(
        name=short_name(m.spec),
        path=str(m.path),
        stage=(m.manifest or {}).get("stage") if m.path.suffix == ".gguf" else _stage(m.path),
        sha256=content_hash(m.path) if config.hash_models else None,
        quality=_quality_dict(results),
        perplexity=ppl,
        memory={
            "params": header["params"],
            "disk_bytes": header["size"],
            "weights_bytes": header["tensor_bytes"],
        },
        predicted_speedup=predicted[0] if predicted else None,
        predicted_from=predicted[1] if predicted else None,
        engine=_engine_info(m, threads),
    )


def _speed_llamacpp(
    evals: list[ModelEval], models: list[_EngineModel], regime: Regime, config: EvalConfig, progress: Any
) -> None:
    from zipkd.evaluate.speed import measure_speed_llamacpp

    task = progress.add_task("speed in llama.cpp (round-robin)", total=None) if progress is not None else None
    rows = measure_speed_llamacpp(
        [m.gguf for m in models], regime, warmup=config.warmup, repeats=config.repeats
    )
    for ev, row in zip(evals, rows, strict=True):
        ev.speed = row
    if task is not None:
        progress.update(task, total=1, completed=1)


def _evaluate_llamacpp(
    specs: list[str], config: EvalConfig, progress: Any, reuse_base: Report | None
) -> Report:
    """`evaluate` in llama.cpp: every check first, then folders exported to temporary GGUFs (removed at the end),
    quality one model at a time, speed of all of them (and the base, at the same GGUF type) round-robin."""
    import shutil
    import tempfile

    from zipkd.runtimes.llamacpp import default_threads, llama_cpp_module

    if config.device != "cpu":
        raise ZipkdError("llama.cpp runs on the CPU here; use --device cpu")
    models = [_engine_model(s) for s in specs]
    base = _llamacpp_base(models, config)
    threads = config.threads or default_threads()
    regime, regime_source, recorded_type = (
        _llamacpp_regime(models, config, threads) if config.speed else (None, None, None)
    )
    quantization = (
        config.quantization
        or next((m.quantization for m in models if m.gguf is not None and m.quantization), None)
        or recorded_type
        or DEFAULT_GGUF_TYPE
    )
    config = dataclasses.replace(config, runtime="llama.cpp", quantization=quantization, threads=threads)
    if regime is not None:
        regime = dataclasses.replace(regime, quantization=quantization)
    from zipkd.runtimes.llamacpp import FTYPES

    if quantization not in FTYPES and any(m.gguf is None for m in [*models, *([base] if base else [])]):
        raise ZipkdError(
            f"model folders would be exported at {quantization} (the type of the .gguf given), which zipkd "
            f"cannot write; pass --quantization (one of {', '.join(FTYPES)})"
        )
    llama_cpp_module()  # a clear error when llama-cpp-python is missing, before any work
    tmp = Path(tempfile.mkdtemp(prefix="zipkd-eval-"))
    try:
        evals = []
        for m in models:
            _materialize(m, quantization, threads, tmp, progress)
            evals.append(_quality_llamacpp(m, config, threads, progress))
        base_eval = None
        if base is not None:
            found = reusable_scores(reuse_base, base.path, config)
            if found is not None:
                source = (reuse_base.created or "an earlier report") if reuse_base is not None else ""
                base_eval = _reuse(found, base.spec, base.path, f"report of {source}")
                if config.speed:
                    _materialize(base, quantization, threads, tmp, progress)
                base_eval.engine = _engine_info(base, threads) if base.gguf is not None else found.engine
            else:
                _materialize(base, quantization, threads, tmp, progress)
                base_eval = _quality_llamacpp(base, config, threads, progress)
        if config.speed:
            timed = ([base] if base_eval else []) + models
            _speed_llamacpp(([base_eval] if base_eval else []) + evals, timed, regime, config, progress)
    finally:
        for m in [*models, *([base] if base else [])]:
            m.tokenizer = None
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(evals, base_eval, regime, regime_source, config)


def _report(
    evals: list[ModelEval],
    base: ModelEval | None,
    regime: Regime | None,
    regime_source: str | None,
    config: EvalConfig,
) -> Report:
    """The report of one evaluation run (either runtime): unique names, provenance, retention against the base."""
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


def resolve_runtime(specs: Sequence[str], config: EvalConfig) -> str:
    """The runtime the models are evaluated in: as configured, or (auto) llama.cpp when one is a .gguf file."""
    if config.runtime != AUTO:
        return config.runtime
    return "llama.cpp" if any(_model_path(s).suffix == ".gguf" for s in specs) else "torch"


def _config_json(config: EvalConfig) -> dict[str, Any]:
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d["tasks"] = list(config.tasks)
    if isinstance(config.regime, Regime):
        d["regime"] = dataclasses.asdict(config.regime)
    return d


__all__ = [
    "AUTO",
    "DEFAULT_LIMIT",
    "DEFAULT_TASKS",
    "RUNTIMES",
    "EvalConfig",
    "Report",
    "available_tasks",
    "base_for",
    "evaluate",
    "gguf_type",
]
