"""Evaluation: lm-eval tasks on offline data, held-out perplexity, measured speed against the base model,
reports (JSON, Markdown, plots) and the CI gate. `evaluate(models, EvalConfig(...)) -> Report`."""

from zipkd.evaluate.api import DEFAULT_LIMIT, DEFAULT_TASKS, EvalConfig, evaluate
from zipkd.evaluate.gate import GateConfig, GateResult, gate
from zipkd.evaluate.harness import available_tasks
from zipkd.evaluate.report import Report, write_report

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_TASKS",
    "EvalConfig",
    "GateConfig",
    "GateResult",
    "Report",
    "available_tasks",
    "evaluate",
    "gate",
    "write_report",
]
