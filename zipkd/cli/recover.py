"""`zipkd recover`: self-data distillation recovery of a pruned model (thin layer over `zipkd.recover`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from zipkd.cli.app import app
from zipkd.cli.common import DeviceOpt, ForceOpt, JsonOpt, OutputOpt, cli_errors, console, progress

DATA = "Data"
TRAIN = "Training"
KD = "Distillation"


@app.command(rich_help_panel="Pipeline")
@cli_errors
def recover(
    model: Annotated[str, typer.Argument(help="The pruned model folder to recover.")],
    output: OutputOpt,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Unpruned teacher (folder, .gguf or embedded name). Default: the first non-pruned model in the "
            "pruned model's manifest chain."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Instruction/response JSONL. Default: zipkd's fine-tuning set (GSM8K, CommonsenseQA, Social IQa, "
            "OpenBookQA, NQ-open; disjoint from every evaluation task).",
            rich_help_panel=DATA,
        ),
    ] = None,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill/--no-distill",
            help="Self-data distillation (teacher rewrites the responses) or plain SFT "
            "on the original responses.",
            rich_help_panel=DATA,
        ),
    ] = True,
    max_examples: Annotated[
        int, typer.Option(help="Seeded subset of the data (0: all).", rich_help_panel=DATA)
    ] = 256,
    max_new_tokens: Annotated[
        int, typer.Option(help="Longest teacher rewrite, in tokens.", rich_help_panel=DATA)
    ] = 128,
    gen_batch_size: Annotated[
        int, typer.Option(help="Teacher generation batch size.", rich_help_panel=DATA)
    ] = 16,
    mix_text: Annotated[
        list[str] | None,
        typer.Option(
            help="Plain text mixed into training (--mix-ratio): a file (.txt, .jsonl, .parquet), or several, each "
            "PATH or PATH:WEIGHT (shares of the text windows), e.g. --mix-text docs.txt:0.7 --mix-text "
            "code.txt:0.3. Default: the pruning calibration mix (prose, code, chat, math; never evaluation text).",
            rich_help_panel=DATA,
        ),
    ] = None,
    mix_ratio: Annotated[
        float, typer.Option(help="Fraction of steps that train on plain-text windows.", rich_help_panel=DATA)
    ] = 0.75,
    text_window: Annotated[
        int, typer.Option(help="Tokens per plain-text window (0: --max-seq-len).", rich_help_panel=DATA)
    ] = 0,
    method: Annotated[str, typer.Option(help="full or lora.", rich_help_panel=TRAIN)] = "full",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel=TRAIN)] = 16,
    steps: Annotated[
        int, typer.Option(help="Optimizer steps (unless --tokens or --budget).", rich_help_panel=TRAIN)
    ] = 200,
    tokens: Annotated[
        str | None,
        typer.Option(
            help="Train on this many tokens instead of --steps, e.g. 2M or 500k (the step count follows from the "
            "data order, so it is the same on every machine).",
            rich_help_panel=TRAIN,
            show_default=False,
        ),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Finish within this wall time instead of --steps, e.g. 20m, 90s, 1.5h, counted from the start "
            "(teacher rewrites included). The step count is planned from the speed of the warm-up steps (it may "
            "grow once, when later steps run faster) and recorded in the manifest; rerun with --steps N to repeat "
            "the run elsewhere.",
            rich_help_panel=TRAIN,
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Sequences per step (over all processes).", rich_help_panel=TRAIN)
    ] = 8,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate (default: full fine-tuning 1e-3 up to 76 steps, 3e-4 from 400, log-linear between; LoRA 5e-4).",
            rich_help_panel=TRAIN,
        ),
    ] = None,
    max_seq_len: Annotated[int, typer.Option(help="Longest training sequence.", rich_help_panel=TRAIN)] = 256,
    checkpoint_every: Annotated[
        int, typer.Option(help="Checkpoint interval (steps); a rerun resumes.", rich_help_panel=TRAIN)
    ] = 50,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (bf16 mixed precision on GPUs with bf16 and CPUs with AMX or AVX512-BF16, else fp32), fp32 or bf16.",
            rich_help_panel=TRAIN,
        ),
    ] = "auto",
    kd: Annotated[
        str,
        typer.Option(
            help="Logit distillation against the teacher: none, forward, reverse, mix. Off by default: at "
            "equal wall time the steps the teacher's forward pass costs recovered more than its soft targets.",
            rich_help_panel=KD,
        ),
    ] = "none",
    kd_weight: Annotated[
        float, typer.Option(help="Loss = (1-w)·CE + w·KD, when --kd is on.", rich_help_panel=KD)
    ] = 0.5,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.", rich_help_panel=KD)] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Seed (data subset, order, init).", rich_help_panel="Reproducibility")
    ] = 0,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Recover quality lost to pruning: the teacher rewrites the fine-tuning responses in its own words
    (self-data distillation), then the pruned model is fine-tuned on them, optionally with logit distillation.
    Interrupted runs resume from the last checkpoint when rerun with the same command."""
    from zipkd.recover.api import RecoverConfig
    from zipkd.recover.api import recover as run_recover
    from zipkd.recover.data import RewriteSettings
    from zipkd.recover.train import KD_MODES, METHODS, PRECISIONS, TrainConfig

    for name, value, allowed in (
        ("--method", method, METHODS),
        ("--kd", kd, KD_MODES),
        ("--precision", precision, PRECISIONS),
    ):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=name)
    if max_examples < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--max-examples")
    train_cfg = TrainConfig(
        steps=steps,
        tokens=tokens,
        budget=budget,
        batch_size=batch_size,
        lr=lr,
        method=method,
        lora_rank=lora_rank,
        lora_alpha=2.0 * lora_rank,
        kd=kd,
        kd_weight=kd_weight,
        temperature=temperature,
        mix_ratio=mix_ratio,
        max_seq_len=max_seq_len,
        checkpoint_every=checkpoint_every,
        seed=seed,
        precision=precision,
    )
    config = RecoverConfig(
        teacher=teacher,
        data=str(data) if data else None,
        distill=distill,
        max_examples=max_examples or None,
        rewrite=RewriteSettings(max_new_tokens=max_new_tokens, batch_size=gen_batch_size),
        mix_text=tuple(mix_text) if mix_text else None,
        text_window=text_window or None,
        train=train_cfg,
        device=device,
    )
    with progress() as bar:
        out = run_recover(model, config, output, force=force, progress=bar)
    from zipkd.manifest import read_manifest

    manifest = read_manifest(out) or {}
    m, rec = manifest.get("metrics", {}), manifest.get("recovery", {})
    stats = (rec.get("distilled_set") or {}).get("stats", {})
    summary = {
        "output": str(out),
        "teacher": manifest.get("config", {}).get("teacher"),
        "final_loss": m.get("final_loss"),
        "steps": m.get("steps"),
        "tokens": m.get("tokens"),
        "tokens_per_s": m.get("tokens_per_s"),
        "resumed_from_step": m.get("resumed_from_step"),
        "rewritten": stats.get("rewritten"),
        "examples": m.get("examples"),
    }
    if as_json:
        console.print_json(json.dumps(summary))
        return
    rewritten = (
        f"{summary['rewritten']}/{summary['examples']} responses rewritten" if distill else "plain SFT"
    )
    console.print(
        f"[bold green]recovered[/] → {out}  ({rewritten}; {summary['steps']} steps, "
        f"{summary['tokens']:,} tokens at {summary['tokens_per_s']:,.0f} tok/s; final loss "
        f"{summary['final_loss']:.4f}"
        + (f"; resumed from step {summary['resumed_from_step']}" if summary["resumed_from_step"] else "")
        + ")",
        highlight=False,
    )
