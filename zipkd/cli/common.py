"""Shared CLI pieces: option types, consoles, the error wrapper and progress bars."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from zipkd.errors import INTERRUPTED, TERMINATED, USER_ERROR, Terminated, ZipkdError

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = "Model: `smollm2-135m` (embedded default), a Hugging Face model folder, or a .gguf file."
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=True)]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder (written atomically).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
SeedOpt = Annotated[
    int, typer.Option(help="Random seed (recorded in the manifest).", rich_help_panel="Reproducibility")
]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")]
REGIME_PANEL = "Target regime (what latency and speedup are measured on)"
BatchOpt = Annotated[int, typer.Option(min=1, help="Sequences per forward.", rich_help_panel=REGIME_PANEL)]
SeqLenOpt = Annotated[int, typer.Option(min=1, help="Prompt tokens (prefill).", rich_help_panel=REGIME_PANEL)]
ContextOpt = Annotated[
    int, typer.Option(min=1, help="KV-cache tokens (decode).", rich_help_panel=REGIME_PANEL)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def cli_errors(func: F) -> F:
    """Turn user errors into one line on stderr and exit code 2, the code of a usage error (no traceback);
    SIGTERM unwinds like Ctrl-C, so temporary outputs are removed and locks released (see zipkd.errors)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from zipkd.paths import offline_env

        offline_env()
        _quiet_libraries()
        previous = _terminate_on_sigterm()
        try:
            return func(*args, **kwargs)
        except ZipkdError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(USER_ERROR) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(INTERRUPTED) from None
        except Terminated:
            err_console.print("[bold red]terminated[/]")
            raise typer.Exit(TERMINATED) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def _terminate_on_sigterm() -> Any:
    """Raise `Terminated` in the main thread on SIGTERM; returns the previous handler (None off the main
    thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one unwind, even if the signal repeats
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _quiet_libraries() -> None:
    """Library progress bars and warnings would drown ours; only when those libraries are already imported
    do we pay for touching them."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()


def progress(transient: bool = False):
    """A rich progress bar on stderr with elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


def parse_speedup(value: str) -> float:
    """Accept `2x`, `2`, `2.0` (and `1.5X`): `zipkd.prune.speedup`'s parser, as a Typer error."""
    from zipkd.prune.speedup import parse_speedup as parse

    try:
        return parse(value)
    except ZipkdError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_speedups(value: str) -> list[float]:
    return [parse_speedup(v) for v in value.split(",") if v.strip()]


RuntimeOpt = Annotated[
    str,
    typer.Option(
        help="Where speed is measured: eager (PyTorch), cudagraphs (PyTorch, CUDA only) or llama.cpp (the CPU "
        "serving engine: GGUF models at --quantization, --threads).",
        rich_help_panel=REGIME_PANEL,
    ),
]
QuantizationOpt = Annotated[
    str | None,
    typer.Option(
        help="With --runtime llama.cpp: the GGUF type (f32, f16, bf16, q8_0 (default), q6_k, q5_k_m, q4_k_m, "
        "q4_0, …). With eager/cudagraphs: time blocks quantized in memory with a `zipkd quantize` method.",
        rich_help_panel=REGIME_PANEL,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(min=1, help="llama.cpp threads (default: all cores).", rich_help_panel=REGIME_PANEL),
]
DecodeTokensOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="llama.cpp decode: tokens generated one at a time after a --context-token prompt.",
        rich_help_panel=REGIME_PANEL,
    ),
]


def regime_from_options(**fields: Any):
    """A Regime from CLI options, with one clear error for a runtime/quantization mismatch."""
    from zipkd.latency.runtimes import RUNTIMES
    from zipkd.latency.table import Regime

    runtime = fields.get("runtime") or "eager"
    if runtime not in RUNTIMES:
        raise typer.BadParameter(
            f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}", param_hint="--runtime"
        )
    q = fields.get("quantization")
    if not RUNTIMES[runtime].torch and q is not None:
        from zipkd.runtimes.llamacpp import FTYPES

        if q.strip().lower() not in FTYPES:
            raise ZipkdError(
                f"--runtime {runtime} takes a GGUF type for --quantization ({', '.join(FTYPES)}); {q!r} is not "
                "one (torch-only methods such as bnb-int8 or quanto-int8 do not run in llama.cpp)"
            )
        fields["quantization"] = q.strip().lower()
    elif RUNTIMES[runtime].torch and (fields.get("threads") is not None):
        raise typer.BadParameter("--threads applies to --runtime llama.cpp only", param_hint="--threads")
    return Regime(**fields)


def quiet_lm_eval() -> None:
    """lm-eval logs a warning per model object and per task; our progress bar says what runs."""
    import logging
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-document bars (read when tqdm is imported)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
