"""The CI gate: compare a fresh report with a baseline report and name every metric that regressed.

Checked for each evaluated model against the baseline report's first model:
- each task's primary score: a paired test on the same documents (below) fails the task only when the drop is
  statistically significant at `confidence` AND larger than `max_drop` (absolute, e.g. 0.02 = 2 points);
- held-out perplexity may rise by at most `max_ppl_increase` (relative);
- weights in memory may grow by at most `max_memory_increase` (relative);
- the speedup measured against the base model in this run must be at least `min_speedup` (the one check that
  needs no baseline).
Reports are only comparable when they score the same tasks on the same documents.

The paired test. Each document is answered right or wrong in both reports; only the documents answered
differently say anything about a drop: `losses` (right in the baseline, wrong now) and `gains` (the reverse), of
`n`. The drop is (losses − gains) / n. A task fails when both
- the exact one-sided McNemar test rejects "no drop": P(Binomial(losses + gains, 1/2) ≥ losses) ≤ 1 − confidence;
- Tango's score test for paired proportions rejects "the drop is at most max_drop" at the same level, with a
  continuity correction of one answer: z = (losses − gains − n·max_drop − 1) / sqrt(n (2 q + max_drop (1 −
  max_drop))) > z_confidence, q being the rate of gains that maximises the likelihood under drop = max_drop
  (Tango 1998). At max_drop = 0 this is McNemar's corrected test. Inverting it gives the one-sided lower
  confidence bound of the drop that the gate reports: the task fails when that bound exceeds max_drop (and the
  exact test agrees).
The false-failure rate of a true drop of exactly max_drop stays at or below 1 − confidence (tests/test_gate.py
computes it exactly).

The detectable drop is the smallest true drop the gate fails with `POWER` (80%) probability at this n, computed
exactly from the trinomial law of (losses, gains) with the share of documents answered differently
(`discordance`) held at the observed one (and at least the drop itself, which needs that many losses). A gate
with too few documents cannot see drops near max_drop: `sample_size_table()` says how many it needs
(docs/gate.md)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from zipkd.errors import ZipkdError
from zipkd.evaluate.report import ModelEval, Report

POWER = 0.8  # the detectable drop is the true drop failed this often
MAX_QUESTIONS = 100_000  # `questions_needed` searches up to this many documents
DISCORDANCE_RATES = (0.05, 0.10, 0.20, 0.30, 0.40)  # rows of the sample-size table in docs/gate.md


@dataclass
class GateConfig:
    """What the gate allows: `max_drop` is the size of a task-score drop that matters, `confidence` that of the
    paired test; None turns a check off (`min_speedup`: off by default)."""

    max_drop: float = 0.02
    min_speedup: float | None = None
    max_ppl_increase: float | None = 0.05
    max_memory_increase: float | None = 0.05
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0 <= self.max_drop <= 1:
            raise ZipkdError(f"max drop must be between 0 and 1 (a score difference), got {self.max_drop}")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise ZipkdError(f"min speedup must be positive, got {self.min_speedup}")
        for name in ("max_ppl_increase", "max_memory_increase"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ZipkdError(f"{name.replace('_', ' ')} must be at least 0, got {v}")
        if not 0.5 <= self.confidence < 1:
            raise ZipkdError(
                f"confidence must be at least 0.5 and below 1 (e.g. 0.95), got {self.confidence}"
            )


@dataclass
class Check:
    """One gated metric of one model: its value, the baseline's, what is allowed and whether it passed."""

    model: str
    metric: str
    value: float | None
    reference: float | None
    limit: str
    passed: bool
    detail: str | None = None  # how it was decided (the paired test's numbers)

    def describe(self) -> str:
        val = "n/a" if self.value is None else f"{self.value:.4g}"
        ref = "" if self.reference is None else f" (baseline {self.reference:.4g})"
        detail = f"; {self.detail}" if self.detail else ""
        return f"{self.model}: {self.metric} = {val}{ref}, allowed {self.limit}{detail}"


@dataclass
class GateResult:
    """Every check, and warnings about how some were judged (a baseline without per-document results)."""

    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failures


# ------------------------------------------------------------------ the paired test


@functools.lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    """log k! for k = 0..n."""
    return np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1)))))


def _binomial_pmf(size: Any, p: float, k: Any, log_fact: np.ndarray) -> np.ndarray:
    """P(X = k) for X ~ Binomial(size, p), elementwise (0 where k > size); `log_fact` holds log k! up to the
    largest size."""
    size, k = np.asarray(size), np.asarray(k)
    rest = np.maximum(size - k, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(k > 0, k * np.log(p), 0.0) + np.where(rest > 0, rest * np.log1p(-p), 0.0)
        pmf = np.exp(log_fact[size] - log_fact[np.minimum(k, size)] - log_fact[rest] + log_p)
    return np.where(k <= size, pmf, 0.0)


def _upper_tails(size: Any, p: float, k: Any, log_fact: np.ndarray) -> np.ndarray:
    """P(X ≥ k) for X ~ Binomial(size, p), for rows of sizes (`size` a column) and columns 0..max size of k:
    summed from the top, so that small tails stay exact."""
    pmf = _binomial_pmf(size, p, k, log_fact)
    return np.cumsum(pmf[..., ::-1], axis=-1)[..., ::-1]


def mcnemar_p(losses: int, gains: int) -> float:
    """Exact one-sided McNemar p-value of a drop: P(Binomial(losses + gains, 1/2) ≥ losses)."""
    size = losses + gains
    return float(min(1.0, _upper_tails(size, 0.5, np.arange(size + 1), _log_factorials(size))[losses]))


def score_z(losses: Any, gains: Any, n: int, margin: float) -> Any:
    """Tango's score statistic for "drop = margin" on n paired documents, continuity-corrected by one answer
    (elementwise over arrays of losses and gains); large when the drop exceeds the margin."""
    a, b, m = np.asarray(losses, float), np.asarray(gains, float), float(margin)
    qa, qb, qc = 2.0 * n, -(a + b) + (2.0 * n - a + b) * m, -b * m * (1 - m)
    q = (np.sqrt(np.maximum(qb * qb - 4 * qa * qc, 0.0)) - qb) / (2 * qa)  # gain rate, restricted MLE
    var = n * (2 * q + m * (1 - m))
    num = a - b - n * m - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), np.where(num > 0, np.inf, -np.inf))
    return z if z.ndim else float(z)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def drop_fails(losses: int, gains: int, n: int, max_drop: float, confidence: float) -> bool:
    """The gate's rule for one task: the drop is significant (exact McNemar) and exceeds max_drop (score test)."""
    return mcnemar_p(losses, gains) <= 1 - confidence and score_z(losses, gains, n, max_drop) > _z(confidence)


def lower_bound(losses: int, gains: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound of the drop: the largest margin the score test still rejects."""
    z, lo, hi = _z(confidence), -1.0, 1.0
    if not score_z(losses, gains, n, lo) > z:
        return lo
    while hi - lo > 1e-7:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if score_z(losses, gains, n, mid) > z else (lo, mid)
    return lo


def _likely_counts(n: int, p: float) -> np.ndarray:
    """The counts of Binomial(n, p) within 8 standard deviations (and 2) of the mean: all but a negligible share
    of its mass."""
    half = 8 * math.sqrt(n * p * (1 - p)) + 2
    return np.arange(max(0, math.floor(n * p - half)), min(n, math.ceil(n * p + half)) + 1)


def _fail_thresholds(sizes: np.ndarray, n: int, max_drop: float, confidence: float) -> np.ndarray:
    """For each number of documents answered differently, the fewest losses among them that fail the gate
    (size + 1: none do). Both tests grow with the losses at a fixed number of differing documents."""
    size, losses = sizes[:, None], np.arange(int(sizes.max()) + 1)[None, :]
    exact = _upper_tails(size, 0.5, losses, _log_factorials(n)) <= 1 - confidence
    fails = (losses <= size) & exact & (score_z(losses, size - losses, n, max_drop) > _z(confidence))
    return np.where(fails.any(axis=1), fails.argmax(axis=1), sizes + 1)


def gate_power(n: int, drop: float, discordance: float, max_drop: float, confidence: float) -> float:
    """P(the gate fails a task of n documents) when the true drop is `drop` and the two models answer a share
    `discordance` (≥ drop) of the documents differently: losses and gains are trinomial with rates
    (discordance ± drop) / 2. Exact: a sum over the number of differing documents (in blocks, to bound memory)."""
    if not 0 <= drop <= discordance <= 1:
        raise ValueError(f"need 0 ≤ drop ≤ discordance ≤ 1, got drop {drop}, discordance {discordance}")
    if discordance == 0:
        return 0.0
    log_fact = _log_factorials(n)
    sizes = _likely_counts(n, discordance)
    weights = _binomial_pmf(n, discordance, sizes, log_fact)
    p_loss = min(1.0, (1 + drop / discordance) / 2)
    total = 0.0
    for block in np.array_split(np.arange(len(sizes)), math.ceil(len(sizes) / 64)):
        k = _fail_thresholds(sizes[block], n, max_drop, confidence)[:, None]
        losses = np.arange(int(sizes[block].max()) + 1)[None, :]
        pmf = _binomial_pmf(sizes[block][:, None], p_loss, losses, log_fact)
        total += float(weights[block] @ np.where(losses >= k, pmf, 0.0).sum(axis=1))
    return min(total, 1.0)


def detectable_drop(
    n: int, discordance: float, max_drop: float, confidence: float, power: float = POWER
) -> float | None:
    """The smallest true drop the gate fails with probability `power` on n documents, the share of documents
    answered differently held at `discordance` (raised to the drop where it is smaller); None: not even a drop
    of every document."""

    def fails_often(drop: float) -> bool:
        return gate_power(n, drop, max(discordance, drop), max_drop, confidence) >= power

    if n < 1 or not fails_often(1.0):
        return None
    lo, hi = max_drop, 1.0
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fails_often(mid) else (mid, hi)
    return hi


def questions_needed(
    drop: float, discordance: float, max_drop: float, confidence: float, power: float = POWER
) -> int | None:
    """The fewest documents on which a true `drop` fails the gate with probability `power` (None: more than
    MAX_QUESTIONS). Power rises with n up to the sawtooth of discrete tests, so the bisection may land a few
    documents off the very first n that reaches it."""
    disc = max(discordance, drop)

    def enough(n: int) -> bool:
        return gate_power(n, drop, disc, max_drop, confidence) >= power

    hi = 1
    while not enough(hi):
        if hi >= MAX_QUESTIONS:
            return None
        hi = min(2 * hi, MAX_QUESTIONS)
    lo = hi // 2  # not enough (0: no documents)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def sample_size_table(confidence: float = 0.95, power: float = POWER) -> str:
    """The tables of docs/gate.md (Markdown): documents needed to detect a drop, and the drop detectable at a
    number of documents, for typical shares of documents two models answer differently."""

    def count(n: int | None) -> str:
        return f"> {MAX_QUESTIONS:,}" if n is None else f"{n:,}"

    def points(d: float | None) -> str:
        return "—" if d is None else f"{100 * d:.1f}"

    sizes = (50, 200, 1000, 5000)
    lines = [
        f"Documents a task needs so that a true drop fails the gate {power:.0%} of the time "
        f"({confidence:.0%} confidence):",
        "",
        "| answered differently | 2-point drop, `--max-drop 0` | 4-point drop, `--max-drop 0.02` |",
        "|---|---|---|",
    ]
    for r in DISCORDANCE_RATES:
        lines.append(
            f"| {r:.0%} | {count(questions_needed(0.02, r, 0.0, confidence, power))} | "
            f"{count(questions_needed(0.04, r, 0.02, confidence, power))} |"
        )
    lines += [
        "",
        f"Smallest true drop (points) that fails the default gate (`--max-drop 0.02`) {power:.0%} of the time:",
        "",
        "| answered differently | " + " | ".join(f"n = {n:,}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for r in DISCORDANCE_RATES:
        cells = [points(detectable_drop(n, r, 0.02, confidence, power)) for n in sizes]
        lines.append(f"| {r:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PairedTest:
    """The paired comparison of one task: of n documents, `losses` were right in the baseline and wrong now,
    `gains` the reverse."""

    losses: int
    gains: int
    n: int
    confidence: float
    p_value: float  # exact one-sided McNemar
    lower_bound: float  # one-sided lower confidence bound of the drop
    detectable: float | None  # the true drop failed with POWER probability at this n and discordance
    fails: bool

    @property
    def drop(self) -> float:
        return (self.losses - self.gains) / self.n

    @property
    def discordance(self) -> float:
        return (self.losses + self.gains) / self.n

    def describe(self) -> str:
        seen = (
            f"not even a drop on every document fails {POWER:.0%} of the time at n = {self.n}"
            if self.detectable is None
            else f"a true drop of {self.detectable:.3f} fails {POWER:.0%} of the time at n = {self.n}"
        )
        return (
            f"drop {self.drop:.3f} ({self.losses} lost, {self.gains} gained of {self.n}), "
            f"{self.confidence:.0%} lower bound {self.lower_bound:.3f}, McNemar p = {self.p_value:.2g}; {seen}"
        )


def paired_test(losses: int, gains: int, n: int, max_drop: float, confidence: float) -> PairedTest:
    """Every number of the paired test of one task (see the module docstring)."""
    if n < 1 or losses < 0 or gains < 0 or losses + gains > n:
        raise ValueError(f"need 0 ≤ losses + gains ≤ n, n ≥ 1; got {losses}, {gains}, {n}")
    return PairedTest(
        losses,
        gains,
        n,
        confidence,
        p_value=mcnemar_p(losses, gains),
        lower_bound=lower_bound(losses, gains, n, confidence),
        detectable=detectable_drop(n, (losses + gains) / n, max_drop, confidence),
        fails=drop_fails(losses, gains, n, max_drop, confidence),
    )


# ------------------------------------------------------------------ reports


def _outcomes(q: dict[str, Any], task: str, where: str) -> tuple[list[int], str] | None:
    """(doc ids, "1"/"0" per document) of one task's quality entry; None when it has none (an older report)."""
    ids, correct = q.get("doc_ids"), q.get("correct")
    if ids is None or correct is None:
        return None
    if not isinstance(ids, list) or not isinstance(correct, str) or len(ids) != len(correct):
        raise ZipkdError(
            f"{where}'s per-document results of {task} are malformed (doc ids and answers differ)"
        )
    if set(correct) - {"0", "1"}:
        raise ZipkdError(f"{where}'s per-document results of {task} hold other marks than 0 and 1")
    return ids, correct


def check_comparable(report: Report, baseline: Report) -> None:
    """Refuse a baseline that scored other tasks or other documents (another --limit, other task data)."""
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
            q, r = m.quality[task], ref.quality[task]
            if q.get("n") != r.get("n"):
                raise ZipkdError(
                    f"the baseline scored {r.get('n')} documents of {task}, this run {q.get('n')}; use the "
                    f"baseline's --limit ({baseline.limit}) so the two score the same documents"
                )
            now, then = _outcomes(q, task, "this run"), _outcomes(r, task, "the baseline")
            if now is not None and then is not None and now[0] != then[0]:
                raise ZipkdError(
                    f"the baseline scored other documents of {task} than this run (the document ids differ); "
                    "make a new baseline with this zipkd and the same --limit"
                )
            digests = (q.get("docs_sha256"), r.get("docs_sha256"))
            if None not in digests and digests[0] != digests[1]:
                raise ZipkdError(
                    f"the documents of {task} under the baseline's ids are not this run's (the task data "
                    "changed); make a new baseline on this data"
                )


def _quality_check(m: ModelEval, ref: ModelEval, task: str, cfg: GateConfig) -> tuple[Check, bool]:
    """The check of one task's score, and whether it was paired (False: a report without per-document results,
    judged by the point difference of the scores)."""
    q, r = m.quality[task], ref.quality[task]
    metric = q["metric"]
    if r.get("metric") != metric:
        raise ZipkdError(f"{task}: the baseline is judged by {r.get('metric')}, this run by {metric}")
    now, then = _outcomes(q, task, "this run"), _outcomes(r, task, "the baseline")
    check = Check(m.name, f"{task} {metric}", q["score"], r["score"], f"drop ≤ {cfg.max_drop:g}", True)
    if now is None or then is None:
        check.passed = r["score"] - q["score"] <= cfg.max_drop + 1e-12
        check.detail = "scores compared as numbers, no per-document results"
        return check, False
    losses = sum(a == "1" and b == "0" for a, b in zip(then[1], now[1], strict=True))
    gains = sum(a == "0" and b == "1" for a, b in zip(then[1], now[1], strict=True))
    test = paired_test(losses, gains, len(now[1]), cfg.max_drop, cfg.confidence)
    check.passed, check.detail = not test.fails, test.describe()
    return check, True


def _baseline_checks(
    m: ModelEval, ref: ModelEval, tasks: list[str], cfg: GateConfig
) -> tuple[list[Check], set[str]]:
    """Quality, perplexity and memory of one model against the baseline's; and the tasks judged unpaired."""
    checks, unpaired = [], set()
    for task in tasks:
        check, paired = _quality_check(m, ref, task, cfg)
        checks.append(check)
        if not paired:
            unpaired.add(task)
    if cfg.max_ppl_increase is not None and ref.perplexity and m.perplexity:
        a, b = m.perplexity, ref.perplexity
        if (a.get("max_length"), a.get("tokens")) != (b.get("max_length"), b.get("tokens")):
            raise ZipkdError(
                "the baseline's held-out perplexity used other windows or another token count; "
                "re-run with the same perplexity settings"
            )
        checks.append(
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
        checks.append(
            Check(
                m.name,
                "weights in memory (MiB)",
                now_mem / 2**20,
                ref_mem / 2**20,
                f"growth ≤ {cfg.max_memory_increase:.0%}",
                now_mem <= ref_mem * (1 + cfg.max_memory_increase),
            )
        )
    return checks, unpaired


def _speedup_check(m: ModelEval, min_speedup: float) -> Check:
    """The speedup of one model measured against the base timed in the same run."""
    s = m.measured_speedup
    limit = f"≥ {min_speedup:g}x"
    if s is None:
        limit += " (speed was not measured)" if not m.speed else " (no base model was timed: pass --base)"
    return Check(m.name, "measured speedup vs base", s, None, limit, s is not None and s >= min_speedup)


def gate(report: Report, baseline: Report | None = None, config: GateConfig | None = None) -> GateResult:
    """Every check of every evaluated model of `report` (see the module docstring): against `baseline` when one
    is given; the speedup floor (`config.min_speedup`) with or without one."""
    cfg = config or GateConfig()
    result = GateResult()
    if baseline is not None:
        check_comparable(report, baseline)
    unpaired: set[str] = set()
    for m in report.models:
        if baseline is not None:
            checks, missing = _baseline_checks(m, baseline.models[0], report.tasks, cfg)
            result.checks += checks
            unpaired |= missing
        if cfg.min_speedup is not None:
            result.checks.append(_speedup_check(m, cfg.min_speedup))
    if unpaired:
        result.warnings.append(
            f"no per-document results for {', '.join(sorted(unpaired))} (a baseline written by an older zipkd): "
            f"their scores were compared as numbers (drop ≤ {cfg.max_drop:g}), without the paired test, so noise "
            "can fail them; re-run `zipkd eval` on the baseline model to make a baseline the paired test can use"
        )
    return result
