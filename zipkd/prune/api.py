"""Python API: `prune(lm, PruneConfig(target_speedup=2.0))` → one pruned model per target, and `save_pruned`.

    from zipkd import PruneConfig, load_model, prune_model, save_pruned
    lm = load_model("smollm2-135m")
    config = PruneConfig(target_speedup="1.5x,2x")
    save_pruned(prune_model(lm, config), lm, "pruned", config)   # pruned/1.5x, pruned/2x

The method (`config.method`) is looked up in the registry `zipkd.prune.methods.METHODS`; what it declares
(calibration, Hessians, Fisher weighting, search, refit) decides what is collected and how surgery runs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from zipkd.data.assets import calib_mix
from zipkd.data.text import allocate, calibration_batch, load_texts, parse_weighted
from zipkd.errors import ZipkdError
from zipkd.latency.profile import check_table_config, load_or_profile, parse_device, table_cache_path
from zipkd.latency.table import LatencyTable, Regime
from zipkd.manifest import set_seed
from zipkd.models.formats import folder_format
from zipkd.models.io import read_config, save_model
from zipkd.models.surgery import LayerShape, base_geometry, layer_shapes, pruned_in_config
from zipkd.outputs import atomic_dir, check_output
from zipkd.prune.database import ModelDatabase
from zipkd.prune.driver import (
    apply_choice,
    build_database,
    capture_inputs,
    check_prunable,
    check_reprunes,
    collect_fisher,
    is_pruned,
)
from zipkd.prune.methods import METHODS, PruneMethod, get_method
from zipkd.prune.search import (
    check_layout,
    check_reachable,
    select,
    select_layout_uniform,
    select_uniform,
    shrink_errors,
    summed_error,
)
from zipkd.prune.speedup import parse_speedups


def _auto_chunk(width: int) -> int:
    """MLP channels removed per OBS step: ~64 steps per layer (1 for narrow MLPs). On SmolLM2 (width 1536)
    chunks of 12, 24 and 48 give level errors within 0.05% of each other; each step costs a pass over H⁻¹."""
    return max(1, width // 64)


@dataclass
class PruneConfig:
    """What `prune` does. Validated on construction; the CLI and recipes build one and call `prune`."""

    # one target or a family: 2.0, "2x", (1.5, 2.0, 3.0), "1.5x,2x,3x" (stored as sorted floats)
    target_speedup: float | str | Sequence[float | str] = 2.0
    method: str = (
        "zipkd"  # a registered method: zipkd | magnitude | shortgpt | wanda-sp (zipkd.prune.methods)
    )
    samples: int = 32  # calibration sequences
    calib_len: int = 512  # tokens per calibration sequence
    # calibration: files (.txt, .jsonl, .parquet), each `PATH` or `PATH:WEIGHT` (weights are shares of the
    # samples); None: zipkd's offline mix of prose, code, chat and math (`zipkd.data.assets.calib_mix`)
    calib: str | Sequence[str] | None = None
    damp: float = 0.01  # λ: H + λ·mean(diag H)·I of the database (the OBS removal order and errors)
    refit_damp: float | None = None  # λ of surgery's re-fit; it pulls the update toward the sliced weights
    seed: int = 0
    regime: Regime = field(default_factory=Regime)  # where the speedup is measured (latency table)
    table: str | None = None  # a latency table file (else cached or profiled for `regime`)
    force_table: bool = False  # accept a table whose fingerprint does not match
    device: str | None = None  # where layers are processed (default: the regime's device)
    sequential: bool = True  # re-fit each pruned layer on inputs through the already-pruned layers
    fisher_samples: int = 16  # sequences whose loss gradients weight the errors, spread (0: plain errors)
    mlp_chunk: int | None = None  # channels per OBS step (None: width // 64)
    batch_size: int = 4  # calibration sequences per forward
    resolution: int = 2000  # latency units of dense/resolution in the DP
    # heterogeneous: each layer its own KV groups and MLP width (llama.cpp via zipkd's GGUF export, zipkd's
    # loader); uniform: one (KV groups, width) in every kept layer plus dropped layers, described by the standard
    # config fields alone, so every engine loads it (transformers, vLLM, TensorRT-LLM, SGLang, TGI, llama.cpp)
    layout: str = "heterogeneous"
    # heterogeneous search: pull each layer's error curves toward the layers' mean curve (0 = trust the calibration
    # errors as they are, 1 = the same curve in every layer); a hedge against text unlike the calibration mix.
    # Chosen by leaving one calibration domain out (`bench_prune.py --lodo`): 0.5 and 1 were worse there.
    error_shrink: float = 0.0

    def __post_init__(self) -> None:
        self.target_speedup = parse_speedups(self.target_speedup)
        check_layout(self.layout)
        if self.method not in METHODS:
            raise ZipkdError(f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.samples < 1 or self.calib_len < 2:
            raise ZipkdError("calibration needs at least 1 sample of at least 2 tokens")
        if not 0 < self.damp < 10:
            raise ZipkdError(f"damp must lie in (0, 10) (got {self.damp})")
        if self.refit_damp is not None and not 0 < self.refit_damp <= 1000:
            raise ZipkdError(f"refit damp must lie in (0, 1000] (got {self.refit_damp})")
        if self.calib is not None:
            self.calib = tuple(str(c) for c in ([self.calib] if isinstance(self.calib, str) else self.calib))
            parse_calib(self.calib)  # validates the weights
        if self.fisher_samples < 0:
            raise ZipkdError("fisher_samples must be at least 0")
        if not 0.0 <= self.error_shrink <= 1.0:
            raise ZipkdError(f"error shrinkage must lie in [0, 1] (got {self.error_shrink})")
        if self.batch_size < 1 or self.resolution < 10:
            raise ZipkdError("batch_size must be ≥ 1 and resolution ≥ 10")
        if self.mlp_chunk is not None and self.mlp_chunk < 1:
            raise ZipkdError("mlp_chunk must be at least 1")
        if isinstance(self.regime, dict):
            self.regime = Regime(**self.regime)

    @property
    def targets(self) -> tuple[float, ...]:
        return self.target_speedup  # type: ignore[return-value]

    @property
    def pruning_method(self) -> PruneMethod:
        return get_method(self.method)

    @property
    def needs_calibration(self) -> bool:
        return self.pruning_method.needs_calibration

    @property
    def calib_sources(self) -> list[tuple[Path, float]]:
        """(file, share of the samples) of every calibration source; [] for methods without calibration."""
        if not self.needs_calibration:
            return []
        if self.calib is None:
            return list(calib_mix().values())
        return parse_calib(self.calib)

    @property
    def calib_path(self) -> Path | None:
        """The one calibration file this config reads (None: several, or none for methods without
        calibration)."""
        sources = self.calib_sources
        return sources[0][0] if len(sources) == 1 else None

    @property
    def update_damp(self) -> float:
        return self.damp if self.refit_damp is None else self.refit_damp


def parse_calib(items: Sequence[str]) -> list[tuple[Path, float]]:
    """`PATH` or `PATH:WEIGHT` calibration entries -> (path, weight), the weights normalised to sum to 1."""
    return parse_weighted(items, "calibration")


@dataclass
class PruneResult:
    """One pruned model: its per-layer shapes (the input's layer order, 0 = block removed) and predictions
    (speedups over the unpruned base model that the latency table describes)."""

    target: float
    model: Any
    shapes: list[LayerShape]
    predicted_speedup: float
    predicted_ms: float
    dense_ms: float
    error: float
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return target_label(self.target)


def target_label(target: float) -> str:
    """Folder name for a target: 2.0 → `2x`, 1.5 → `1.5x`."""
    return f"{target:g}x"


def precheck(src: str | os.PathLike, config: PruneConfig) -> None:
    """Refusals from the model's config.json and the given latency table alone, before any weights load: a
    quantized model, an already pruned one that the method or layout cannot prune further, a table for another
    model, an unreachable target."""
    src = Path(src)
    if src.suffix == ".gguf" or not src.is_dir():
        return
    cfg = read_config(src)
    fmt = folder_format(cfg)
    if fmt is not None:
        raise ZipkdError(f"{src} is quantized; prune the unquantized model (then quantize the result)")
    if pruned_in_config(cfg):
        check_repruning(config)
    if config.table is None:
        return
    tab = check_table_config(
        LatencyTable.load(config.table), SimpleNamespace(**cfg), config.regime, config.force_table
    )
    method = config.pruning_method
    check_reachable(tab, config.targets, method.uniform, method.whole_layers, config.layout)


def check_repruning(
    config: PruneConfig, shapes: Sequence[LayerShape] = (), table: LatencyTable | None = None
) -> float | None:
    """What pruning an already pruned model (the ZipLM family schedule: prune, recover, prune again) needs: a
    method that re-prunes, the per-layer search, layer shapes on the table's grid and targets beyond the
    model's own predicted speedup (targets are speedups over the unpruned base). Returns that speedup (None
    without a table)."""
    check_reprunes(config.pruning_method)
    if config.layout == "uniform":
        raise ZipkdError(
            "--layout uniform prunes an unpruned model; an already pruned one is pruned further layer by layer "
            "(--layout heterogeneous)"
        )
    if table is None:
        return None
    for s in shapes:
        if s.kv_heads not in table.attention_ms or s.intermediate not in table.mlp_ms:
            raise ZipkdError(
                f"this pruned model has a layer ({s.kv_heads} KV groups, MLP width {s.intermediate}) off the "
                "latency table's grid; prune it further with the table it was pruned for"
            )
    now = table.predict_speedup(shapes)
    low = [t for t in config.targets if t <= now * (1 + 1e-9)]
    if low:
        raise ZipkdError(
            f"this model is already pruned to a predicted {now:.2f}x of its unpruned base; targets are speedups "
            f"over the base, so ask for more than {now:.2f}x (got {', '.join(target_label(t) for t in low)})"
        )
    return now


def _module(lm: Any) -> Any:
    return lm.model if hasattr(lm, "tokenizer") and hasattr(lm, "model") else lm


def load_calibration(config: PruneConfig) -> list[tuple[list[str], float]]:
    """The texts and weight of every calibration source (each file read and checked: a bad file fails here,
    before any model work)."""
    return [(load_texts(path), w) for path, w in config.calib_sources]


def calibration_tokens(
    lm: Any,
    config: PruneConfig,
    calib_texts: Sequence[str] | Sequence[tuple[Sequence[str], float]] | None = None,
):
    """The seeded (samples × calib_len) calibration token windows and their sha256. Texts: `calib_texts` (one
    list of documents, or (documents, weight) per source), else the config's sources. Each source gets its
    share of the samples, cut from its own token stream (one source: exactly the single-file windows)."""
    if calib_texts is None:
        sources = load_calibration(config)
    elif calib_texts and not isinstance(calib_texts[0], str):
        sources = [(list(t), float(w)) for t, w in calib_texts]  # type: ignore[misc]
    else:
        sources = [(list(calib_texts), 1.0)]  # type: ignore[arg-type]
    if getattr(lm, "tokenizer", None) is None:
        raise ZipkdError("calibration needs the model's tokenizer")
    counts = allocate(config.samples, [w for _, w in sources])
    batches = []
    for i, ((texts, _), n) in enumerate(zip(sources, counts, strict=True)):
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise ZipkdError("calibration data is empty")
        if n:
            batches.append(calibration_batch(lm.tokenizer, texts, n, config.calib_len, config.seed + i))
    tokens = torch.cat(batches)
    digest = hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()
    return tokens, digest


def fisher_rows(n: int, k: int) -> torch.Tensor:
    """Which of the `n` calibration sequences the Fisher pass differentiates through: `k` spread evenly over
    them. The sequences come in blocks, one per calibration source, so every source keeps about its share
    (16 of the default 32 sequences: 7 prose, 3 each of code, chat and math; the first 16 would be 13 prose and
    3 code). Spreading was chosen on development text (BENCHMARKS.md)."""
    if k >= n:
        return torch.arange(n)
    return torch.tensor([i * n // k for i in range(k)])


def latency_table(
    lm: Any, config: PruneConfig, table: LatencyTable | str | os.PathLike | None = None, progress: Any = None
) -> LatencyTable:
    """The given table (checked against the model and device), else the cached or freshly profiled one."""
    given = table if table is not None else config.table
    model = _module(lm)
    if given is None and not table_cache_path(model.config, config.regime).is_file():
        if is_pruned(model):  # no full-size layer left to time
            raise ZipkdError(
                "this model is pruned and no latency table of its unpruned base is cached for this regime and "
                "machine; pass --table (the one it was pruned with, or `zipkd profile BASE -o table.json`), or "
                "run `zipkd profile BASE` once so the cache holds it"
            )
        # Profiling times the model on the regime's device: move it there for the measurement only.
        dev = parse_device(config.regime.device)
        home = next(model.parameters()).device
        if home != dev and not (home.type == dev.type == "cuda" and dev.index is None):
            try:
                model.to(dev)
                return load_or_profile(lm, config.regime, progress=progress)
            finally:
                model.to(home)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return load_or_profile(
        lm, config.regime, table=given, accept_mismatch=config.force_table, progress=progress
    )


def build(
    lm: Any,
    config: PruneConfig,
    table: LatencyTable,
    calib_texts: Sequence[str] | None = None,
    progress: Any = None,
) -> tuple[ModelDatabase, Any]:
    """Calibrate and build the method's database on the table's grid; returns it and the layer-0 inputs that the
    "sequential" refit needs (else None)."""
    method = config.pruning_method
    model = _module(lm)
    check_prunable(model, method)
    set_seed(config.seed)
    device = torch.device(config.device or config.regime.device)
    meta: dict[str, Any] = {}
    acts = None
    fisher = None
    if method.needs_calibration:
        tokens, digest = calibration_tokens(lm, config, calib_texts)
        meta.update(calib_sha256=digest, calib_tokens=int(tokens.numel()), calib_shape=list(tokens.shape))
        if method.uses_fisher and config.fisher_samples > 0:
            t0 = time.perf_counter()
            rows = fisher_rows(tokens.shape[0], config.fisher_samples)
            fisher = collect_fisher(model, tokens[rows], config.batch_size, device, progress)
            meta.update(fisher_s=round(time.perf_counter() - t0, 2))
        acts = capture_inputs(model, tokens, config.batch_size, device)
    width = base_geometry(model.config).intermediate_size
    chunk = config.mlp_chunk or _auto_chunk(width)
    refit = method.refit(config.sequential)
    t0 = time.perf_counter()
    first = acts.clone() if (acts is not None and refit == "sequential") else None
    db = build_database(
        model,
        acts,
        method,
        table.attention_levels,
        table.mlp_levels,
        config.damp,
        device,
        chunk,
        fisher,
        refit == "dense",
        progress,
    )
    meta.update(database_s=round(time.perf_counter() - t0, 2), mlp_chunk=chunk)
    db.meta.update(meta)
    return db, first


def prune_model(
    lm: Any,
    config: PruneConfig,
    calib_texts: Sequence[str] | None = None,
    progress: Any = None,
    table: LatencyTable | str | os.PathLike | None = None,
) -> list[PruneResult]:
    """Prune `lm` (a LoadedModel or a bare model) to every target speedup in `config`; the input is not
    modified. One calibration pass and one database serve all targets.

    An already pruned input (with a method that `reprunes`) is pruned further from its own layer shapes, to
    speedups over its unpruned base: the ZipLM family schedule (prune to 1.5x, recover, prune that to 2x)."""
    method = config.pruning_method
    model = _module(lm)
    check_prunable(model, method)  # before any profiling
    tab = table if isinstance(table, LatencyTable) else latency_table(lm, config, table, progress)
    check_reachable(
        tab, config.targets, method.uniform, method.whole_layers, config.layout
    )  # before any calibration
    own = layer_shapes(model)
    input_speedup = check_repruning(config, own, tab) if is_pruned(model) else None
    t0 = time.perf_counter()
    db, first = build(lm, config, tab, calib_texts, progress)
    # Every target is checked before any surgery, so an unreachable one fails fast.
    choices = [select_structure(db, tab, t, config) for t in config.targets]
    device = torch.device(config.device or config.regime.device)
    refit = method.refit(config.sequential)
    results = []
    for choice in choices:
        t1 = time.perf_counter()
        acts = first.clone() if first is not None else None
        pruned = apply_choice(
            model,
            db,
            choice.shapes,
            acts,
            refit,
            config.update_damp,
            device,
            progress,
            label=target_label(choice.target),
        )
        pruned.eval()
        info = {
            **db.meta,
            "layout": layout_of(choice.shapes),
            "refit": refit,
            "surgery_s": round(time.perf_counter() - t1, 2),
            "input_predicted_speedup": input_speedup,  # None: the input was unpruned
            "table": {
                "path": tab.meta.get("cache_path") or (str(config.table) if config.table else None),
                "regime": asdict(tab.regime),
                "fingerprint": tab.fingerprint,
                "dense_ms": tab.dense_ms(),
                "measured_dense_ms": tab.measured_dense_ms,
            },
        }
        results.append(
            PruneResult(
                choice.target,
                pruned,
                choice.shapes[: len(own)],  # past them: the input's dropped layers, still dropped
                choice.predicted_speedup,
                choice.predicted_ms,
                choice.dense_ms,
                choice.error,
                config.method,
                info,
            )
        )
    for r in results:
        r.info["total_s"] = round(time.perf_counter() - t0, 2)
    return results


def select_structure(db: ModelDatabase, tab: LatencyTable, target: float, config: PruneConfig):
    """The structure `config` asks for at `target`: the method's uniform width search (magnitude), the portable
    uniform layout, or the heterogeneous DP."""
    method = config.pruning_method
    if method.uniform:  # the method's own uniform width search (magnitude)
        return select_uniform(db, tab, target)
    if config.layout == "uniform" and not method.whole_layers:  # whole-layer drops are uniform already
        return select_layout_uniform(db, tab, target)
    choice = select(shrink_errors(db, config.error_shrink), tab, target, config.resolution)
    choice.error = summed_error(db, choice.shapes)  # reported on the database's own (unshrunk) errors
    return choice


def layout_of(shapes: Sequence[LayerShape]) -> str:
    """ "uniform" when every kept layer keeps both blocks at one shape (standard config fields describe it)."""
    kept = {(s.kv_heads, s.intermediate) for s in shapes if not s.empty}
    return "uniform" if len(kept) == 1 and all(k and w for k, w in kept) else "heterogeneous"


# `zipkd.prune` is the package, so `from zipkd import prune` cannot be this function: zipkd exports it as
# `prune_model`; the short name stays for existing callers (`from zipkd.prune import prune`).
prune = prune_model


def save_pruned(
    results: PruneResult | Sequence[PruneResult],
    lm: Any,
    out: str | os.PathLike,
    config: PruneConfig,
    force: bool = False,
    calib_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Write each result with its manifest: one target → `out`; several → `out/<target>x` (atomically as a
    whole). Returns the folders written."""
    results = [results] if isinstance(results, PruneResult) else list(results)
    if not results:
        raise ZipkdError("nothing to save")
    model_path = getattr(lm, "path", None)
    tokenizer = getattr(lm, "tokenizer", None)
    sources = [p for p, _ in config.calib_sources] if calib_path is None else [Path(calib_path)]
    inputs = {"model": model_path, **{f"calib_{i + 1}" if i else "calib": p for i, p in enumerate(sources)}}

    def write(r: PruneResult, dest: Path, force_: bool) -> Path:
        layers = [asdict(s) for s in r.shapes]
        metrics = {
            "predicted_speedup": r.predicted_speedup,
            "predicted_ms": r.predicted_ms,
            "dense_predicted_ms": r.dense_ms,
            "search_error": r.error,
        }
        extra = {
            "prune": {
                "method": r.method,
                "target_speedup": r.target,
                "layer_shapes": layers,
                "kept_layers": sum(1 for s in r.shapes if not s.empty),
                **r.info,
            }
        }
        return save_model(
            r.model,
            tokenizer,
            dest,
            "prune",
            inputs=inputs,
            config=config,
            seed=config.seed,
            metrics=metrics,
            extra=extra,
            force=force_,
        )

    if len(results) == 1:
        return [write(results[0], Path(out), force)]
    root = check_output(out, force, tuple(Path(p) for p in inputs.values() if p is not None))
    written = []
    with atomic_dir(root, force=force) as tmp:
        for r in results:
            write(r, tmp / r.label, False)
            written.append(root / r.label)
    return written
