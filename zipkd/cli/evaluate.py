"""`zipkd eval`: lm-eval tasks, held-out perplexity, measured speed vs the base model, a report, and the CI gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from zipkd.cli.app import app
from zipkd.cli.common import ForceOpt, JsonOpt, cli_errors, console, err_console, progress, quiet_lm_eval

if TYPE_CHECKING:
    from zipkd.evaluate.api import EvalConfig
    from zipkd.evaluate.gate import GateConfig, GateResult

_QUALITY = "Quality"
_RUNTIME = "Runtime"
_SPEED = "Speed regime (default: the one in the model's manifest)"
_GATE = "CI gate"
_OUT = "Output"


def parse_limit(value: str | None) -> int | float | None:
    """`50` documents per task, `0.1` of each task, or `all`."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("all", "none"):
        return None
    try:
        x = float(text)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a limit; write a count (50), a fraction (0.1) or all"
        ) from None
    if x == 0:
        raise typer.BadParameter(
            "a limit of 0 scores no documents; write a count (50), a fraction (0.1) or all",
            param_hint="--limit",
        )
    if not x > 0 or (x >= 1 and x != int(x)):
        raise typer.BadParameter(f"limit {value!r} must be a whole count, a fraction below 1, or all")
    return int(x) if x >= 1 else x


def _tasks(value: str | None) -> list[str] | None:
    return None if value is None else [t for t in value.split(",") if t.strip()]


@app.command(name="eval", rich_help_panel="Pipeline")
@cli_errors
def evaluate(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model(s) to evaluate: `smollm2-135m`, model folders or .gguf files. Several (or a folder "
            "of models, as `zipkd prune` writes for several targets) = a family: one report, one Pareto plot.",
            show_default=False,
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="Base model for retention and measured speedup (default: the first model of the "
            "manifest chain, if any).",
            show_default=False,
        ),
    ] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Compare with no base model.")] = False,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated tasks (default: all, or the baseline report's). See --list-tasks.",
            rich_help_panel=_QUALITY,
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        str | None,
        typer.Option(
            help="Documents per task: a count, a fraction, or `all` (default: 50, a fixed random "
            "sample; or the baseline report's).",
            rich_help_panel=_QUALITY,
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="lm-eval batch size (default 8, or the baseline's).",
            rich_help_panel=_QUALITY,
            show_default=False,
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(min=16, help="lm-eval context length (default: the model's).", rich_help_panel=_QUALITY),
    ] = None,
    perplexity: Annotated[
        bool, typer.Option(help="Held-out perplexity (LAMBADA passages).", rich_help_panel=_QUALITY)
    ] = True,
    ppl_max_length: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Perplexity window in tokens (default 512, or the baseline's).",
            rich_help_panel=_QUALITY,
            show_default=False,
        ),
    ] = None,
    ppl_tokens: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Held-out tokens scored for perplexity (default 8192, or the baseline's).",
            rich_help_panel=_QUALITY,
            show_default=False,
        ),
    ] = None,
    list_tasks: Annotated[bool, typer.Option("--list-tasks", help="List the tasks and exit.")] = False,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="torch or llama.cpp (default: llama.cpp for .gguf files, else torch). In llama.cpp, model "
            "folders are exported to a temporary GGUF at --quantization; tasks, perplexity and speed (prefill "
            "and decode) run in the engine, the base as a GGUF of the same type.",
            rich_help_panel=_RUNTIME,
            show_default=False,
        ),
    ] = None,
    quantization: Annotated[
        str | None,
        typer.Option(
            help="llama.cpp: the GGUF type model folders and the base are exported at (q8_0, q4_k_m, f32, …; "
            "default: the .gguf input's type, else q8_0).",
            rich_help_panel=_RUNTIME,
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="llama.cpp threads (default: all cores).",
            rich_help_panel=_RUNTIME,
            show_default=False,
        ),
    ] = None,
    speed: Annotated[bool, typer.Option(help="Measure speed and memory.", rich_help_panel=_SPEED)] = True,
    device: Annotated[
        str | None,
        typer.Option(
            help="cpu or cuda[:N]: where tasks run and speed is measured (default cpu).",
            rich_help_panel=_SPEED,
            show_default=False,
        ),
    ] = None,
    regime: Annotated[
        str | None,
        typer.Option(
            help="prefill or decode (llama.cpp times both; this one is the measured speedup).",
            rich_help_panel=_SPEED,
            show_default=False,
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(min=1, help="Sequences per forward.", rich_help_panel=_SPEED, show_default=False),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(min=1, help="Prompt tokens (prefill).", rich_help_panel=_SPEED, show_default=False),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(min=1, help="KV-cache tokens (decode).", rich_help_panel=_SPEED, show_default=False),
    ] = None,
    decode_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="llama.cpp decode: tokens timed after a --context-token prompt (default 64; prompt 128).",
            rich_help_panel=_SPEED,
            show_default=False,
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (median).", rich_help_panel=_SPEED)] = 7,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="Baseline report (report.json or its folder): exit 1 naming every metric that regressed. "
            "Task scores are compared document by document with a paired test (docs/gate.md).",
            rich_help_panel=_GATE,
            show_default=False,
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="The drop of a task score that matters (absolute; default 0.02): a task fails when the paired "
            "test shows, at --confidence, a drop larger than this. Needs --baseline.",
            rich_help_panel=_GATE,
            show_default=False,
        ),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            help="Confidence of the paired test (default 0.95): a true drop of --max-drop fails at most "
            "1 − confidence of the time. Needs --baseline.",
            rich_help_panel=_GATE,
            show_default=False,
        ),
    ] = None,
    min_speedup: Annotated[
        str | None,
        typer.Option(
            help="Smallest allowed measured speedup vs the base model timed in this run (e.g. 1.8 or 1.8x); "
            "gates with or without --baseline.",
            rich_help_panel=_GATE,
            show_default=False,
        ),
    ] = None,
    max_ppl_increase: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Largest allowed relative rise of held-out perplexity (default 0.05). Needs --baseline.",
            rich_help_panel=_GATE,
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write report.json, report.md and PNG plots into this folder.",
            rich_help_panel=_OUT,
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Score models on lm-eval tasks (offline data never used for pruning or recovery), held-out perplexity,
    speed vs their base measured in one alternating run, size and memory; optionally gate against a baseline."""
    from zipkd.errors import ZipkdError
    from zipkd.evaluate.harness import available_tasks, resolve_tasks

    if list_tasks:
        for name in available_tasks():
            console.print(name)
        return
    if not models:
        raise typer.BadParameter(
            "give at least one model (e.g. smollm2-135m or a model folder)", param_hint="MODELS"
        )
    if base is not None and no_base:
        raise typer.BadParameter("--base and --no-base exclude each other")
    if runtime is not None and runtime not in ("torch", "llama.cpp"):
        raise typer.BadParameter(
            f"unknown runtime {runtime!r}; choose torch or llama.cpp", param_hint="--runtime"
        )
    _check_gguf_inputs([*models, *([base] if base else [])])
    if regime is not None and regime not in ("prefill", "decode"):
        raise typer.BadParameter(
            f"unknown regime {regime!r}; choose prefill or decode", param_hint="--regime"
        )
    gate_config = _gate_config(
        baseline,
        max_drop=max_drop,
        confidence=confidence,
        max_ppl_increase=max_ppl_increase,
        min_speedup=_speedup(min_speedup),
    )
    quiet_lm_eval()

    from zipkd.evaluate.api import AUTO, DEFAULT_LIMIT, DEFAULT_TASKS, EvalConfig
    from zipkd.evaluate.api import evaluate as run_eval
    from zipkd.evaluate.gate import check_comparable, gate
    from zipkd.evaluate.report import Report, markdown, write_report

    ref = Report.load(baseline, role="baseline") if baseline is not None else None
    task_list = _tasks(tasks) or (list(ref.tasks) if ref else list(DEFAULT_TASKS))
    try:
        task_list = resolve_tasks(task_list)
    except ZipkdError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tasks") from None
    lim = parse_limit(limit) if limit is not None else (ref.limit if ref else DEFAULT_LIMIT)
    overrides = {
        k: v
        for k, v in (
            ("device", device),
            ("regime", regime),
            ("batch", batch),
            ("seq_len", seq_len),
            ("context", context),
            ("decode_tokens", decode_tokens),
        )
        if v is not None
    }
    ref_cfg = ref.config if ref else {}
    ppl_window = ppl_max_length or ref_cfg.get("ppl_max_length") or EvalConfig.ppl_max_length
    ppl_count = ppl_tokens or ref_cfg.get("ppl_max_tokens") or EvalConfig.ppl_max_tokens
    config = EvalConfig(
        tasks=task_list,
        limit=lim,
        batch_size=batch_size or ref_cfg.get("batch_size") or EvalConfig.batch_size,
        max_length=max_length or ref_cfg.get("max_length"),
        device=device or "cpu",
        perplexity=perplexity,
        ppl_max_length=ppl_window,
        ppl_max_tokens=ppl_count,
        speed=speed,
        regime=overrides or None,
        repeats=repeats,
        base=None if no_base else (base or AUTO),
        runtime=runtime or AUTO,
        quantization=quantization,
        threads=threads,
    )
    if ref is not None and set(config.tasks) != set(ref.tasks):
        check_comparable(Report(tasks=list(config.tasks), limit=lim, models=[]), ref)  # raises, naming both
    if gate_config.min_speedup is not None:
        _require_base(models, config)
    import contextlib

    from zipkd.outputs import check_output, output_lock

    given = [Path(m).expanduser() for m in [*models, *([base] if base else [])]]
    inputs = tuple(p for p in given if p.exists())  # model folders, families of them, .gguf files
    out = check_output(output, force, inputs) if output is not None else None
    with output_lock(out) if out is not None else contextlib.nullcontext():
        with progress() as bar:
            report = run_eval(models, config, progress=bar, reuse_base=ref)
        if out is not None:
            write_report(report, out, force=force)
    if json_out:
        console.print_json(json.dumps(report.to_json()))
    else:
        from rich.markdown import Markdown

        console.print(Markdown(markdown(report)))
        if output is not None:
            console.print(f"report written to {output}")
    if ref is not None or gate_config.min_speedup is not None:
        _print_gate(gate(report, ref, gate_config), baseline, json_out)


def _gate_config(baseline: Path | None, **given: float | None) -> GateConfig:
    """The gate's settings from the options given (None: not given, the default). Those that compare with a
    baseline are refused without one, before any work: a gate option never goes unchecked."""
    from zipkd.evaluate.gate import GateConfig

    if baseline is None:
        for name, value in given.items():
            if value is not None and name != "min_speedup":
                option = "--" + name.replace("_", "-")
                raise typer.BadParameter(
                    "it needs --baseline (the report to compare with)", param_hint=option
                )
    return GateConfig(**{k: v for k, v in given.items() if v is not None})


def _require_base(models: list[str], config: EvalConfig) -> None:
    """--min-speedup compares with the base model timed in the same run: refuse, before any work, a run that
    would time none."""
    from zipkd.evaluate.api import base_for

    if base_for(models, config) is None:
        why = (
            "--no-base leaves none; drop --no-base"
            if config.base is None
            else "no model other than these is given or named by their manifests; pass --base MODEL"
        )
        raise typer.BadParameter(
            f"it gates the speedup measured against a base model timed in this run, and {why}",
            param_hint="--min-speedup",
        )


def _print_gate(result: GateResult, baseline: Path | None, json_out: bool) -> None:
    """Every check (ok lines on stdout, or stderr with --json; regressions on stderr), then the verdict; exit 1
    when a check failed."""
    out = err_console if json_out else console  # keep stdout pure JSON with --json
    against = f" against {baseline}" if baseline is not None else ""
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    for check in result.checks:
        if check.passed:
            out.print(f"[green]ok[/] {check.describe()}", highlight=False, soft_wrap=True)
    if not result.passed:
        for check in result.failures:
            err_console.print(f"[bold red]regressed:[/] {check.describe()}", highlight=False, soft_wrap=True)
        err_console.print(
            f"[bold red]gate failed:[/] {len(result.failures)} check(s) failed{against}", soft_wrap=True
        )
        raise typer.Exit(1)
    out.print(f"[green]gate passed[/] ({len(result.checks)} checks{against})", soft_wrap=True)


def _check_gguf_inputs(specs: list[str]) -> None:
    """A corrupt or truncated .gguf is refused before any other work (one line, never a crash in llama.cpp)."""
    from zipkd.runtimes.llamacpp import check_gguf

    for spec in specs:
        if str(spec).lower().endswith(".gguf"):
            check_gguf(spec)


def _speedup(value: str | None) -> float | None:
    """`1.8`, `1.8x`; below 1 allowed (a quantized model may be gated to stay at most so much slower)."""
    if value is None:
        return None
    try:
        s = float(value.strip().lower().removesuffix("x"))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a speedup; write e.g. 1.8 or 1.8x", param_hint="--min-speedup"
        ) from None
    if not 0 < s < float("inf"):
        raise typer.BadParameter(f"speedup {value!r} must be a positive number", param_hint="--min-speedup")
    return s
