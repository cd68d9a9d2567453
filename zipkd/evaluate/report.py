"""The evaluation report: versioned JSON (machine-readable; what the CI gate reads), a Markdown table, and the
folder that holds both with the plots."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError

SCHEMA_VERSION = 1
KIND = "zipkd-eval-report"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class ModelEval:
    """Everything measured about one model. `quality[task]` = {metric, score, stderr, n, metrics}."""

    name: str
    path: str | None
    stage: str | None = None
    sha256: str | None = None
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    perplexity: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None  # median_ms, p10_ms, p90_ms, repeats, tokens_per_s
    memory: dict[str, Any] = field(default_factory=dict)  # params, disk_bytes, weights_bytes, peak_bytes
    measured_speedup: float | None = None  # base median / this median, same run
    predicted_speedup: float | None = None
    predicted_from: str | None = None
    retention: dict[str, float | None] = field(default_factory=dict)  # score / base score per task
    scored_in: str | None = None  # None: scored in this run; else the earlier report its scores come from
    # llama.cpp: runtime, quantization (GGUF type), threads, gguf (the file given) or exported_from (the folder
    # exported to a temporary GGUF), tokenizer (where the Hugging Face tokenizer came from). None: torch.
    engine: dict[str, Any] | None = None

    def score(self, task: str) -> float:
        return float(self.quality[task]["score"])

    @property
    def mean_score(self) -> float | None:
        scores = [q["score"] for q in self.quality.values()]
        return sum(scores) / len(scores) if scores else None

    @property
    def mean_retention(self) -> float | None:
        vals = [v for v in self.retention.values() if v is not None]
        return sum(vals) / len(vals) if vals else None


@dataclass
class Report:
    tasks: list[str]
    limit: int | float | None
    models: list[ModelEval]
    base: ModelEval | None = None
    regime: dict[str, Any] | None = None
    regime_source: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    kind: str = KIND

    def all_models(self) -> list[ModelEval]:
        return ([self.base] if self.base is not None else []) + list(self.models)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for m, md in zip(self.all_models(), ([d["base"]] if self.base else []) + d["models"], strict=True):
            md["mean_score"] = m.mean_score
            md["mean_retention"] = m.mean_retention
        return _finite(d)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "report") -> Report:
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise ZipkdError(f'{source} is not a zipkd eval report (no "kind": "{KIND}")')
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ZipkdError(
                f"{source} has report schema version {d.get('schema_version')}, this zipkd reads version "
                f"{SCHEMA_VERSION}; re-run `zipkd eval` on the baseline model with this zipkd"
            )
        tasks = _field(d, "tasks", list, source, "it")
        models = [
            _model(m, source, f"model {i + 1}") for i, m in enumerate(_field(d, "models", list, source, "it"))
        ]
        base = _model(d["base"], source, "its base") if d.get("base") else None
        fields = {
            k: d[k]
            for k in ("regime", "regime_source", "config", "created", "versions", "hardware")
            if k in d
        }
        return cls(tasks=list(tasks), limit=d.get("limit"), models=models, base=base, **fields)

    @classmethod
    def load(cls, path: str | os.PathLike, role: str = "report") -> Report:
        """Read `report.json` (or the folder holding it); `role` names the file in messages ("baseline")."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_JSON
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ZipkdError(f"{role} {path} not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ZipkdError(f"cannot read {role} {path}: {exc}") from exc
        return cls.from_json(data, f"{role} {path}")


def _field(d: dict[str, Any], key: str, kind: type, source: str, what: str) -> Any:
    """`d[key]` when it is a `kind`; else one line naming the file, the entry and what was expected."""
    noun = {list: "list", dict: "mapping", str: "string"}[kind]
    if key not in d:
        raise ZipkdError(f"{source} is not a zipkd eval report: {what} has no {key!r} {noun}")
    if not isinstance(d[key], kind):
        raise ZipkdError(
            f"{source} is not a zipkd eval report: {what}'s {key!r} is a {type(d[key]).__name__}, not a {noun}"
        )
    return d[key]


def _model(d: Any, source: str, what: str) -> ModelEval:
    """One model entry of a report (the fields this zipkd knows; a name and a quality mapping are required)."""
    if not isinstance(d, dict):
        raise ZipkdError(
            f"{source} is not a zipkd eval report: {what} is a {type(d).__name__}, not a mapping"
        )
    _field(d, "name", str, source, what)
    for task, q in _field(d, "quality", dict, source, what).items():
        if not isinstance(q, dict) or "score" not in q or "metric" not in q:
            raise ZipkdError(
                f"{source} is not a zipkd eval report: {what}'s quality of {task!r} has no metric and score"
            )
    known = ModelEval.__dataclass_fields__
    return ModelEval(**{"path": None, **{k: v for k, v in d.items() if k in known}})


def _finite(obj: Any) -> Any:
    """NaN/inf are not JSON: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------ markdown


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f}"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(report: Report) -> str:
    """A Markdown report: quality per task (with retention vs base), perplexity, speed and memory."""
    cols = report.all_models()
    names = [f"{m.name} (base)" if m is report.base else m.name for m in cols]
    lines = ["# zipkd evaluation", ""]
    limit = "all documents" if report.limit is None else f"limit {report.limit} per task"
    lines.append(
        f"Tasks: {', '.join(report.tasks)} ({limit}); scores are lm-eval's, ± one standard error; "
        "retention = score / base score."
    )
    engine = _engine_line(report)
    if engine:
        lines.append(engine)
    if report.regime and report.regime.get("runtime") == "llama.cpp":
        r = report.regime
        lines.append(
            f"Speed in llama.cpp on the CPU, {_threads(r.get('threads'))}: prefill 1×{r['seq_len']} and "
            f"decode of {r.get('decode_tokens', 64)} tokens after a {r['context']}-token prompt (from "
            f"{report.regime_source}); all models timed round-robin in one run; measured speedup = {r['regime']}."
        )
    elif report.regime:
        r = report.regime
        shape = f"seq_len {r['seq_len']}" if r["regime"] == "prefill" else f"context {r['context']}"
        lines.append(
            f"Speed regime: {r['device']} {r['regime']}, batch {r['batch']}, {shape}, {r['dtype']}, "
            f"{r['runtime']} (from {report.regime_source}); all models timed alternately in one run."
        )
    for m in cols:
        if m.scored_in:
            lines.append(f"Scores of {m.name} reused from the {m.scored_in} (same weights, same settings).")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(cols)]
    for task in report.tasks:
        metric = next((m.quality[task]["metric"] for m in cols if task in m.quality), "")
        cells = []
        for m in cols:
            q = m.quality.get(task)
            if q is None:
                cells.append("—")
                continue
            cell = f"{q['score']:.3f}"
            if q.get("stderr") is not None:
                cell += f" ± {q['stderr']:.3f}"
            ret = m.retention.get(task)
            if m is not report.base and ret is not None:
                cell += f" ({ret:.1%})"
            cells.append(cell)
        lines.append(f"| {task} ({metric}) | " + " | ".join(cells) + " |")
    rows: list[tuple[str, list[str]]] = [
        ("mean score", [_num(m.mean_score) for m in cols]),
        ("mean retention", ["—" if m is report.base else _num(m.mean_retention, "{:.1%}") for m in cols]),
        ("held-out perplexity", [_num((m.perplexity or {}).get("perplexity"), "{:.2f}") for m in cols]),
        *_speed_rows(report, cols),
        ("predicted speedup", [_num(m.predicted_speedup, "{:.2f}x") for m in cols]),
        (
            "parameters (M)",
            [_num(m.memory.get("params") and m.memory["params"] / 1e6, "{:.1f}") for m in cols],
        ),
        ("weights on disk, MiB", [_mib(m.memory.get("disk_bytes")) for m in cols]),
        ("weights in memory, MiB", [_mib(m.memory.get("weights_bytes")) for m in cols]),
        ("peak memory, MiB", [_mib(m.memory.get("peak_bytes")) for m in cols]),
    ]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _engine_line(report: Report) -> str | None:
    """Where the scores come from when models ran in llama.cpp (GGUF type; given or exported)."""
    parts = []
    for m in report.all_models():
        e = m.engine
        if not e or e.get("runtime") != "llama.cpp":
            continue
        parts.append(f"{m.name} {e.get('quantization')}" + (" (exported)" if e.get("exported_from") else ""))
    if not parts:
        return None
    return (
        "Runtime: llama.cpp — tasks and perplexity scored by the engine on the Hugging Face tokenizer's token "
        "ids; GGUF types: " + ", ".join(parts) + " (exported: a model folder written to a temporary GGUF)."
    )


def _speed_rows(report: Report, cols: list[ModelEval]) -> list[tuple[str, list[str]]]:
    """Latency rows: one regime (torch), or prefill and decode (llama.cpp times both)."""
    regimes = [(m.speed or {}).get("regimes") for m in cols]
    if not any(regimes):
        return [
            ("latency, ms (median)", [_num((m.speed or {}).get("median_ms"), "{:.2f}") for m in cols]),
            ("tokens/s", [_num((m.speed or {}).get("tokens_per_s"), "{:,.0f}") for m in cols]),
            ("measured speedup", [_num(m.measured_speedup, "{:.2f}x") for m in cols]),
        ]
    primary = (report.regime or {}).get("regime", "prefill")

    def cell(i: int, name: str, key: str, fmt: str) -> str:
        return _num(((regimes[i] or {}).get(name) or {}).get(key), fmt)

    rows = []
    for name, unit in (("prefill", "ms"), ("decode", "ms/token")):
        rows += [
            (f"{name}, {unit} (median)", [cell(i, name, "median_ms", "{:.2f}") for i in range(len(cols))]),
            (f"{name}, tokens/s", [cell(i, name, "tokens_per_s", "{:,.0f}") for i in range(len(cols))]),
            (
                f"{name} speedup" + (" (measured speedup)" if name == primary else ""),
                [cell(i, name, "speedup", "{:.2f}x") for i in range(len(cols))],
            ),
        ]
    return rows


def write_report(
    report: Report,
    out: str | os.PathLike,
    force: bool = False,
    plots: bool = True,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Write `report.json`, `report.md` and the plots into the folder `out` atomically."""
    from zipkd.outputs import atomic_dir, check_output

    out = check_output(out, force, inputs)
    with atomic_dir(out, force=force) as tmp:
        (tmp / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        (tmp / REPORT_MD).write_text(markdown(report))
        if plots:
            from zipkd.evaluate.plots import save_plots

            save_plots(report, tmp)
    return out


def _threads(n: int | None) -> str:
    return "all cores" if not n else f"{n} thread" + ("s" if n != 1 else "")
