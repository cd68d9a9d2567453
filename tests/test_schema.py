"""One schema per stage: the recipe section, the Python API and the CLI agree on every default, every API option
can be set from a recipe, and `recover: {}` recovers exactly as `zipkd recover` does by default."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from typer.testing import CliRunner

from zipkd.cli import app
from zipkd.errors import ZipkdError
from zipkd.recipe import HARDWARE, SCHEMAS, default_of, parse_recipe

# The command of each stage, and its CLI option names that differ from the section keys.
COMMANDS = {
    "prune": "prune",
    "recover": "recover",
    "quantize": "quantize",
    "eval": "eval",
    "profile": "profile",
}
CLI_NAMES = {"eval": {"speed_repeats": "repeats"}}
# CLI options that use 0 for "none" (Typer has no optional ints with a numeric default), or a word for it.
ZERO_IS_NONE = {("recover", "text_window")}
WORD_IS_NONE = {("profile", "method"): "auto"}
# CLI options that set the hardware regime, not the same-named config field; and options of the command only.
CLI_HARDWARE = {("prune", "device")}
CLI_ONLY = {("quantize", "seq_len")}  # the prompt length of `--measure`


def _command(name: str):
    return next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == name)


def _cli_defaults(stage: str) -> dict[str, object]:
    sig = inspect.signature(_command(COMMANDS[stage]))
    rename = CLI_NAMES.get(stage, {})
    return {rename.get(n, n): p.default for n, p in sig.parameters.items()}


def _normalise(stage: str, key: str, value: object) -> object:
    if (stage, key) in ZERO_IS_NONE and value == 0:
        return None
    if WORD_IS_NONE.get((stage, key)) == value:
        return None
    if stage == "prune" and key == "target_speedup":
        from zipkd.prune.speedup import parse_speedups

        return parse_speedups(value)
    return value


@pytest.mark.parametrize("stage", list(SCHEMAS))
def test_recipe_defaults_are_the_api_defaults(stage):
    schema = SCHEMAS[stage]
    section = parse_recipe(f"output: o\n{stage}: {{}}\n").sections[stage]
    api = schema.config()
    for key, path in schema.keys().items():
        value = api
        for part in path.split("."):
            value = getattr(value, part)
        assert section[key] == value, f"{stage}.{key}: recipe {section[key]!r} != API {value!r}"


@pytest.mark.parametrize("stage", [s for s in COMMANDS if s in SCHEMAS])
def test_cli_defaults_are_the_api_defaults(stage):
    """Every CLI option that sets a field of the stage's config defaults to the API default (None on the CLI
    means "the API's default"); options for the pipeline-filled fields default to the hardware defaults."""
    schema = SCHEMAS[stage]
    keys = schema.keys()
    cli = _cli_defaults(stage)
    checked = 0
    for key, default in cli.items():
        if (stage, key) in CLI_ONLY:
            continue
        if key in keys and (stage, key) not in CLI_HARDWARE:
            want = default_of(schema.config, keys[key])
        elif key in HARDWARE.keys():
            want = default_of(HARDWARE.config, key)
        else:
            continue
        checked += 1
        if default is None:
            continue
        assert _normalise(stage, key, default) == want, (
            f"zipkd {COMMANDS[stage]} --{key}: {default!r} != {want!r}"
        )
    assert checked, f"no CLI option of zipkd {COMMANDS[stage]} maps onto {schema.config.__name__}"


def _api_fields(cls: type, prefix: str = "") -> set[str]:
    """Every leaf field of a config dataclass (nested config dataclasses expanded)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and f.name != "regime":  # the regime is one fixed field
            out |= _api_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize("stage", list(SCHEMAS))
def test_every_api_option_can_be_set_from_a_recipe(stage):
    schema = SCHEMAS[stage]
    settable = set(schema.keys().values())
    fixed = set(schema.fixed)
    assert _api_fields(schema.config) - fixed == settable
    # The pipeline fills the fixed ones from the hardware section, the seed or the stage before.
    assert fixed <= {"seed", "regime", "table", "device", "train.seed", "base"}


def test_values_reach_the_config():
    r = parse_recipe(
        "output: o\nhardware: {device: cpu, batch: 2}\n"
        "prune: {target_speedup: [1.5x, 2], fisher_samples: 0, sequential: false, mlp_chunk: 8}\n"
        "recover: {steps: 3, gen_batch_size: 2, max_new_tokens: 9, examples: 5, lora_rank: 4, method: lora}\n"
        "quantize: {method: nf4}\neval: {tasks: arc_easy, limit: 3, speed_repeats: 2}\n"
    )
    p = r.config("prune", seed=1, regime=r.regime())
    assert p.targets == (1.5, 2.0) and p.fisher_samples == 0 and not p.sequential and p.mlp_chunk == 8
    assert p.regime.batch == 2 and p.seed == 1
    c = r.config("recover", device="cpu", **{"train.seed": 3})
    assert (c.train.steps, c.train.seed, c.train.method, c.train.lora_rank) == (3, 3, "lora", 4)
    assert (c.rewrite.batch_size, c.rewrite.max_new_tokens, c.max_examples) == (2, 9, 5)
    assert r.config("quantize", device="cpu").method == "bnb-nf4"
    e = r.config("eval", device="cpu", regime=r.regime(), base="smollm2-135m")
    assert e.tasks == ("arc_easy",) and e.limit == 3 and e.repeats == 2


def test_api_checks_are_the_recipe_checks():
    """A value the API refuses is refused by the recipe, at its line (mix_ratio 1 used to pass the recipe)."""
    with pytest.raises(ZipkdError) as e:
        parse_recipe("output: o\nrecover:\n  mix_ratio: 1\n  kd: both\nprune:\n  method: sparsegpt\n")
    msg = str(e.value)
    assert msg.startswith("3 problem(s)")
    assert "recipe:3: recover.mix_ratio: mix ratio must be in [0, 1)" in msg
    assert "recipe:4: recover.kd: must be none, forward, reverse or mix" in msg
    assert "recipe:6: prune.method: unknown pruning method 'sparsegpt'" in msg
    with pytest.raises(ZipkdError, match="recover.lora: unknown key .*method: lora"):
        parse_recipe("output: o\nrecover: {lora: true}\n")
    with pytest.raises(ZipkdError, match="recover.seed: unknown key .*the pipeline sets it"):
        parse_recipe("output: o\nrecover: {seed: 1}\n")


def test_recipe_methods_come_from_the_registry():
    from zipkd.prune.methods import METHODS

    for name in METHODS:
        assert parse_recipe(f"output: o\nprune: {{method: {name}}}\n").sections["prune"]["method"] == name


def test_optional_stages():
    r = parse_recipe("output: o\n")
    assert not r.enabled("quantize") and not r.enabled("export") and r.enabled("recover")
    r = parse_recipe("output: o\nquantize: {}\nexport: {quantization: q8_0}\nrecover: {enabled: false}\n")
    assert r.enabled("quantize") and r.enabled("export") and not r.enabled("recover")


def test_empty_recover_section_recovers_like_the_cli_default(monkeypatch, tmp_path):
    """`recover: {}` builds the very RecoverConfig that `zipkd recover MODEL -o OUT` passes to `recover`."""
    import zipkd.recover.api as api

    seen = {}

    def fake_recover(model, config, out=None, force=False, progress=None, callback=None):
        seen["config"] = config
        raise ZipkdError("stop here")

    monkeypatch.setattr(api, "recover", fake_recover)
    res = CliRunner().invoke(app, ["recover", str(tmp_path / "pruned"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "stop here" in res.stderr
    r = parse_recipe("output: o\nrecover: {}\n")
    assert r.config("recover", device=r.hardware["device"], **{"train.seed": r.seed}) == seen["config"]


def test_pipeline_recovers_with_the_recipe_config(monkeypatch, tmp_path):
    """The pipeline's recover stage passes `Recipe.config("recover", ...)` on unchanged."""
    import zipkd.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "recover", lambda model, config, **kw: seen.setdefault("config", config))
    r = parse_recipe("output: o\nseed: 5\nrecover: {}\n")
    pipeline._recover(r, tmp_path / "3-recover", {"model": "m"}, None)
    assert seen["config"] == r.config("recover", device="cpu", **{"train.seed": 5})
    assert seen["config"].train.seed == 5 and seen["config"].train.mix_ratio == 0.75
