"""The CI gate: compare a fresh report with a baseline report and name every metric that regressed.

Checked for each evaluated model against the baseline report's first model:
- each task's primary score may drop by at most `max_drop` (absolute, e.g. 0.02 = 2 points);
- held-out perplexity may rise by at most `max_ppl_increase` (relative);
- weights in memory may grow by at most `max_memory_increase` (relative);
- the speedup measured against the base model in this run must be at least `min_speedup`.
Reports are only comparable when they score the same tasks on the same number of documents."""

from __future__ import annotations

from dataclasses import dataclass, field

from zipkd.errors import ZipkdError
from zipkd.evaluate.report import ModelEval, Report


@dataclass
class GateConfig:
    max_drop: float = 0.02
    min_speedup: float | None = None
    max_ppl_increase: float | None = 0.05
    max_memory_increase: float | None = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.max_drop <= 1:
            raise ZipkdError(f"max drop must be between 0 and 1 (a score difference), got {self.max_drop}")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise ZipkdError(f"min speedup must be positive, got {self.min_speedup}")
        for name in ("max_ppl_increase", "max_memory_increase"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ZipkdError(f"{name.replace('_', ' ')} must be at least 0, got {v}")


@dataclass
class Check:
    model: str
    metric: str
    value: float | None
    reference: float | None
    limit: str
    passed: bool

    def describe(self) -> str:
        val = "n/a" if self.value is None else f"{self.value:.4g}"
        ref = "" if self.reference is None else f" (baseline {self.reference:.4g})"
        return f"{self.model}: {self.metric} = {val}{ref}, allowed {self.limit}"


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failures


def check_comparable(report: Report, baseline: Report) -> None:
    """Refuse a baseline that scored other tasks or another number of documents (another --limit)."""
    if set(report.tasks) != set(baseline.tasks):
        raise ZipkdError(
            f"the baseline report scores tasks {sorted(baseline.tasks)} but this run scores {sorted(report.tasks)}; "
            "re-run with the baseline's --tasks or make a new baseline"
        )
    if not baseline.models:
        raise ZipkdError("the baseline report has no evaluated model")
    ref = baseline.models[0]
    for m in report.models:
        for task in report.tasks:
            n_now, n_ref = m.quality[task].get("n"), ref.quality[task].get("n")
            if n_now != n_ref:
                raise ZipkdError(
                    f"the baseline scored {n_ref} documents of {task}, this run {n_now}; use the baseline's "
                    f"--limit ({baseline.limit}) so the two score the same documents"
                )


def _quality_checks(m: ModelEval, ref: ModelEval, tasks: list[str], cfg: GateConfig) -> list[Check]:
    out = []
    for task in tasks:
        q, r = m.quality[task], ref.quality[task]
        metric = q["metric"]
        if r.get("metric") != metric:
            raise ZipkdError(f"{task}: the baseline is judged by {r.get('metric')}, this run by {metric}")
        drop = r["score"] - q["score"]
        out.append(
            Check(
                m.name,
                f"{task} {metric}",
                q["score"],
                r["score"],
                f"drop ≤ {cfg.max_drop:g}",
                drop <= cfg.max_drop + 1e-12,
            )
        )
    return out


def gate(report: Report, baseline: Report, config: GateConfig | None = None) -> GateResult:
    """Every check of every evaluated model of `report` against `baseline` (see the module docstring)."""
    cfg = config or GateConfig()
    check_comparable(report, baseline)
    ref = baseline.models[0]
    result = GateResult()
    for m in report.models:
        result.checks += _quality_checks(m, ref, report.tasks, cfg)
        if cfg.max_ppl_increase is not None and ref.perplexity and m.perplexity:
            a, b = m.perplexity, ref.perplexity
            if (a.get("max_length"), a.get("tokens")) != (b.get("max_length"), b.get("tokens")):
                raise ZipkdError(
                    "the baseline's held-out perplexity used other windows or another token count; "
                    "re-run with the same perplexity settings"
                )
            result.checks.append(
                Check(
                    m.name,
                    "held-out perplexity",
                    a["perplexity"],
                    b["perplexity"],
                    f"rise ≤ {cfg.max_ppl_increase:.0%}",
                    a["perplexity"] <= b["perplexity"] * (1 + cfg.max_ppl_increase),
                )
            )
        now_mem, ref_mem = m.memory.get("weights_bytes"), ref.memory.get("weights_bytes")
        if cfg.max_memory_increase is not None and now_mem and ref_mem:
            result.checks.append(
                Check(
                    m.name,
                    "weights in memory (MiB)",
                    now_mem / 2**20,
                    ref_mem / 2**20,
                    f"growth ≤ {cfg.max_memory_increase:.0%}",
                    now_mem <= ref_mem * (1 + cfg.max_memory_increase),
                )
            )
        if cfg.min_speedup is not None:
            s = m.measured_speedup
            result.checks.append(
                Check(
                    m.name,
                    "measured speedup vs base",
                    s,
                    None,
                    f"≥ {cfg.min_speedup:g}x"
                    + ("" if s is not None else " (no base model was timed: pass --base)"),
                    s is not None and s >= cfg.min_speedup,
                )
            )
    return result
