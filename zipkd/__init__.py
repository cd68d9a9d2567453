"""zipkd: hardware-aware structured pruning, recovery, quantization and evaluation of causal LMs.

Importing zipkd is cheap (no torch); every stage's verb and config load on first use:

    from zipkd import PruneConfig, load_model, prune_model, save_pruned
    lm = load_model("smollm2-135m")
    config = PruneConfig(target_speedup="2x")
    save_pruned(prune_model(lm, config), lm, "pruned-2x", config)

The verbs carry a suffix (`prune_model`, `recover_model`, `evaluate_models`, `export_model`) because `zipkd.prune`,
`zipkd.recover`, ... are the stage packages; `from zipkd.prune import prune` still works.
"""

from __future__ import annotations

import importlib

# A quantized folder is read by the loader `zipkd.quantize` registers with `zipkd.models.io` (which knows no
# quantizer): importing the (light) package here makes `load_model` read such folders from any entry point.
from zipkd import quantize as _quantize  # noqa: F401

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "ZipkdError": ("zipkd.errors", "ZipkdError"),
    # models
    "LoadedModel": ("zipkd.models.io", "LoadedModel"),
    "load_model": ("zipkd.models.io", "load_model"),
    "save_model": ("zipkd.models.io", "save_model"),
    "resolve_model": ("zipkd.models.io", "resolve_model"),
    "LayerShape": ("zipkd.models.surgery", "LayerShape"),
    "layer_shapes": ("zipkd.models.surgery", "layer_shapes"),
    # profile
    "Regime": ("zipkd.latency.table", "Regime"),
    "LatencyTable": ("zipkd.latency.table", "LatencyTable"),
    "load_or_profile": ("zipkd.latency.profile", "load_or_profile"),
    # prune
    "PruneConfig": ("zipkd.prune.api", "PruneConfig"),
    "PruneResult": ("zipkd.prune.api", "PruneResult"),
    "prune_model": ("zipkd.prune.api", "prune_model"),
    "save_pruned": ("zipkd.prune.api", "save_pruned"),
    # recover
    "RecoverConfig": ("zipkd.recover.api", "RecoverConfig"),
    "TrainConfig": ("zipkd.recover.train", "TrainConfig"),
    "RewriteSettings": ("zipkd.recover.data", "RewriteSettings"),
    "recover_model": ("zipkd.recover.api", "recover"),
    "merge_models": ("zipkd.recover.merge", "merge_models"),
    # quantize: `quantize_model` quantizes a module in place, `save_quantized` a model into a folder
    "QuantizeConfig": ("zipkd.quantize.api", "QuantizeConfig"),
    "quantize_model": ("zipkd.quantize.api", "quantize_model"),
    "save_quantized": ("zipkd.quantize.api", "quantize"),
    # evaluate
    "EvalConfig": ("zipkd.evaluate.api", "EvalConfig"),
    "evaluate_models": ("zipkd.evaluate.api", "evaluate"),
    "write_report": ("zipkd.evaluate.report", "write_report"),
    "perplexity": ("zipkd.evaluate.perplexity", "perplexity"),
    # export
    "ExportConfig": ("zipkd.export.api", "ExportConfig"),
    "export_model": ("zipkd.export.api", "export"),
    # the pipeline
    "Recipe": ("zipkd.recipe", "Recipe"),
    "load_recipe": ("zipkd.recipe", "load_recipe"),
    "parse_recipe": ("zipkd.recipe", "parse_recipe"),
    "run_recipe": ("zipkd.pipeline", "run_recipe"),
}


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'zipkd' has no attribute {name!r}")
    module, attr = target
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", *_LAZY]
