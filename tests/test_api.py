"""The public API as documented: `from zipkd import …` gives every stage's verb and config, lazily."""

from __future__ import annotations

import subprocess
import sys

import zipkd

VERBS = {
    "prune_model": "zipkd.prune.api",
    "recover_model": "zipkd.recover.api",
    "quantize_model": "zipkd.quantize.api",
    "save_quantized": "zipkd.quantize.api",
    "evaluate_models": "zipkd.evaluate.api",
    "export_model": "zipkd.export.api",
    "load_or_profile": "zipkd.latency.profile",
    "run_recipe": "zipkd.pipeline",
}
CONFIGS = (
    "PruneConfig",
    "RecoverConfig",
    "TrainConfig",
    "QuantizeConfig",
    "EvalConfig",
    "ExportConfig",
    "Regime",
)


def test_documented_import_works():
    from zipkd import PruneConfig, load_model, prune_model, save_model  # the module docstring's line

    assert callable(load_model) and callable(save_model) and callable(prune_model)
    assert PruneConfig(target_speedup="2x").targets == (2.0,)


def test_every_stage_has_a_verb_and_a_config():
    for name, module in VERBS.items():
        verb = getattr(zipkd, name)
        assert callable(verb) and verb.__module__ == module, name
    for name in CONFIGS:
        cls = getattr(zipkd, name)
        assert isinstance(cls, type) and cls.__dataclass_fields__, name
    assert set(VERBS) | set(CONFIGS) <= set(zipkd.__all__) and set(zipkd.__all__) <= set(dir(zipkd))


def test_verbs_survive_importing_the_stage_packages():
    """`zipkd.prune` is the package, `zipkd.prune_model` the function, whatever was imported first."""
    import zipkd.prune
    import zipkd.recover

    assert zipkd.prune_model is zipkd.prune.prune is zipkd.prune.api.prune_model
    assert zipkd.recover_model is zipkd.recover.recover
    assert not callable(zipkd.prune) and not callable(zipkd.recover)


def test_import_zipkd_is_lean_and_reads_quantized_folders():
    code = (
        "import sys, zipkd; from zipkd.models import formats; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), "
        "'zipkd_quantization' in formats.FORMATS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"
