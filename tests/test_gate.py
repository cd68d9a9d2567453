"""The CI gate's paired test on synthetic reports (zipkd.evaluate.gate): a real drop fails, noise of the same
model passes, other documents are refused; the test's exact level, power and detectable drop against naive
simulations and textbook formulas."""

from __future__ import annotations

import math
import random
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from zipkd.errors import ZipkdError
from zipkd.evaluate.gate import (
    POWER,
    GateConfig,
    detectable_drop,
    drop_fails,
    gate,
    gate_power,
    lower_bound,
    mcnemar_p,
    questions_needed,
    sample_size_table,
    score_z,
)
from zipkd.evaluate.report import ModelEval, Report

TASK = "arc_easy"


def _report(correct: str, ids: list[int] | None = None, digest: str = "same data") -> Report:
    """A report of one model on one task with per-document results ("1" right, "0" wrong)."""
    n = len(correct)
    quality = {
        "metric": "acc",
        "score": correct.count("1") / n,
        "stderr": None,
        "n": n,
        "metrics": {"acc": correct.count("1") / n},
        "doc_ids": list(range(n)) if ids is None else ids,
        "correct": correct,
        "docs_sha256": digest,
    }
    return Report(tasks=[TASK], limit=n, models=[ModelEval(name="m", path=None, quality={TASK: quality})])


def _answers(n: int, right: int, rng: random.Random) -> str:
    marks = ["1"] * right + ["0"] * (n - right)
    rng.shuffle(marks)
    return "".join(marks)


def _change(correct: str, losses: int, gains: int, rng: random.Random) -> str:
    """`correct` with `losses` of its right answers made wrong and `gains` of its wrong answers made right."""
    marks = list(correct)
    right = [i for i, c in enumerate(marks) if c == "1"]
    wrong = [i for i, c in enumerate(marks) if c == "0"]
    for i in rng.sample(right, losses):
        marks[i] = "0"
    for i in rng.sample(wrong, gains):
        marks[i] = "1"
    return "".join(marks)


def _same_model_noise(correct: str, redraw: float, rng: random.Random) -> str:
    """The same model scored again with noise: each document's answer is drawn afresh (at the model's accuracy)
    with probability `redraw`, so the accuracy stays the same in expectation."""
    acc = correct.count("1") / len(correct)
    return "".join(("1" if rng.random() < acc else "0") if rng.random() < redraw else c for c in correct)


def _simulated_fail_rate(n, drop, discordance, max_drop, confidence, draws, seed) -> float:
    """Naive Monte Carlo of the gate's rule: trinomial (losses, gains, same) draws, each judged by `drop_fails`."""
    rng = np.random.default_rng(seed)
    p = [(discordance + drop) / 2, (discordance - drop) / 2, 1 - discordance]
    counts = rng.multinomial(n, p, size=draws)
    cache: dict[tuple[int, int], bool] = {}
    fails = 0
    for losses, gains, _ in counts.tolist():
        if (losses, gains) not in cache:
            cache[losses, gains] = drop_fails(losses, gains, n, max_drop, confidence)
        fails += cache[losses, gains]
    return fails / draws


# ---------------------------------------------------------------- the gate on synthetic reports


def test_a_real_ten_point_drop_on_200_questions_fails():
    rng = random.Random(0)
    base = _answers(200, 120, rng)  # 60% right
    now = _change(base, losses=25, gains=5, rng=rng)  # 50% right: 10 points lower, 30 answers changed
    result = gate(_report(now), _report(base), GateConfig(max_drop=0.02))
    [check] = result.checks
    assert not check.passed and not result.passed and not result.warnings
    text = check.describe()
    assert "drop 0.100 (25 lost, 5 gained of 200)" in text and "95% lower bound" in text
    assert "McNemar p = " in text and "fails 80% of the time at n = 200" in text
    assert lower_bound(25, 5, 200, 0.95) > 0.02 and mcnemar_p(25, 5) < 0.001
    # and a true 10-point drop with that much churn fails most draws (the power the gate quotes)
    rate = _simulated_fail_rate(200, 0.10, 0.15, 0.02, 0.95, draws=2000, seed=1)
    assert rate == pytest.approx(gate_power(200, 0.10, 0.15, 0.02, 0.95), abs=0.035) and rate > 0.8


def test_shuffled_noise_on_the_same_model_passes():
    rng = random.Random(0)
    base = _answers(200, 120, rng)
    shuffled = "".join(rng.sample(base, len(base)))  # same accuracy, every answer at random: ~48% changed
    result = gate(_report(shuffled), _report(base), GateConfig(max_drop=0.02))
    assert result.passed, result.checks[0].describe()
    # an observed 3-point drop from 26 changed answers: beyond max-drop as a number, but noise; it passes
    noisy = _change(base, losses=16, gains=10, rng=rng)
    [check] = gate(_report(noisy), _report(base), GateConfig(max_drop=0.02)).checks
    assert check.passed and "drop 0.030" in check.describe() and check.reference - check.value > 0.02
    # many re-runs of the same model with noise: the paired rule fails at most 1 − confidence of them; the old
    # point rule (observed drop > max-drop) fails about one in five
    paired = point = 0
    for seed in range(300):
        now = _same_model_noise(base, redraw=0.4, rng=random.Random(seed))
        losses = sum(a == "1" and b == "0" for a, b in zip(base, now, strict=True))
        gains = sum(a == "0" and b == "1" for a, b in zip(base, now, strict=True))
        paired += drop_fails(losses, gains, 200, 0.02, 0.95)
        point += (losses - gains) / 200 > 0.02
    assert paired <= 0.05 * 300 and point > 0.1 * 300


def test_other_documents_are_refused():
    base = _report("1100110011")
    with pytest.raises(ZipkdError, match="other documents of arc_easy"):
        gate(_report("1100110011", ids=[0, 1, 2, 3, 4, 5, 6, 7, 8, 10]), base)
    with pytest.raises(ZipkdError, match="task data"):
        gate(_report("1100110011", digest="other data"), base)
    with pytest.raises(ZipkdError, match="--limit"):
        gate(_report("11001100"), base)
    broken = _report("1100110011")
    broken.models[0].quality[TASK]["correct"] = "110011001"
    with pytest.raises(ZipkdError, match="malformed"):
        gate(broken, base)


def test_a_baseline_without_per_document_results_is_compared_as_numbers_with_a_warning():
    base = _report("1" * 60 + "0" * 40)
    for key in ("doc_ids", "correct", "docs_sha256"):
        del base.models[0].quality[TASK][key]  # as a report of an older zipkd
    result = gate(_report("1" * 59 + "0" * 41), base)
    assert result.passed and "without the paired test" in result.warnings[0] and TASK in result.warnings[0]
    assert "no per-document results" in result.checks[0].describe()
    assert not gate(_report("1" * 50 + "0" * 50), base).passed  # the old rule: a 10-point drop fails


def test_same_results_pass_and_config_is_checked():
    base = _report("10" * 50)
    [check] = gate(base, base).checks
    assert check.passed and "(0 lost, 0 gained of 100)" in check.describe()
    for bad in (0.4, 1.0, 1.5):
        with pytest.raises(ZipkdError, match="confidence"):
            GateConfig(confidence=bad)


# ---------------------------------------------------------------- the test's statistics


def test_mcnemar_and_the_score_test_match_their_textbook_forms():
    for losses, gains in ((0, 0), (5, 0), (7, 3), (30, 12), (3, 9)):
        size = losses + gains
        naive = sum(math.comb(size, k) for k in range(losses, size + 1)) / 2**size
        assert mcnemar_p(losses, gains) == pytest.approx(naive, rel=1e-9)
        if size:  # at margin 0 Tango's score test is McNemar's continuity-corrected test
            assert score_z(losses, gains, 100, 0.0) == pytest.approx((losses - gains - 1) / math.sqrt(size))


def test_lower_bound_inverts_the_score_test():
    z = NormalDist().inv_cdf(0.95)
    for losses, gains in ((0, 0), (4, 1), (12, 3), (30, 29), (2, 20)):
        bound = lower_bound(losses, gains, 100, 0.95)
        for margin in np.linspace(-0.5, 0.5, 41):
            if abs(margin - bound) > 1e-6:
                assert (score_z(losses, gains, 100, margin) > z) == (margin < bound), (losses, gains, margin)


def test_a_true_drop_of_max_drop_fails_at_most_one_minus_confidence():
    """The exact false-failure rate at the null's edge (drop = max-drop), over the share of changed answers."""
    for confidence in (0.9, 0.95, 0.99):
        for n in (30, 200):
            for max_drop in (0.0, 0.02, 0.05):
                for discordance in (0.05, 0.1, 0.2, 0.4):
                    if discordance >= max_drop:
                        rate = gate_power(n, max_drop, discordance, max_drop, confidence)
                        assert rate <= 1 - confidence, (confidence, n, max_drop, discordance, rate)


def test_gate_power_matches_a_naive_simulation():
    for n, drop, discordance, max_drop in ((50, 0.1, 0.2, 0.0), (200, 0.06, 0.1, 0.02), (120, 0.0, 0.3, 0.0)):
        exact = gate_power(n, drop, discordance, max_drop, 0.95)
        simulated = _simulated_fail_rate(n, drop, discordance, max_drop, 0.95, draws=3000, seed=n)
        assert simulated == pytest.approx(exact, abs=0.03), (n, drop, discordance, max_drop)


def test_detectable_drop_fails_80_percent_of_the_time_in_simulation():
    """Tolerance: 4000 draws give a standard error of 0.0063 at 80%; allowed ±0.03."""
    for n, discordance, max_drop in ((200, 0.2, 0.02), (100, 0.1, 0.0)):
        drop = detectable_drop(n, discordance, max_drop, 0.95)
        assert max_drop < drop < 1
        rate = _simulated_fail_rate(n, drop, max(drop, discordance), max_drop, 0.95, draws=4000, seed=7)
        assert rate == pytest.approx(POWER, abs=0.03), (n, discordance, drop, rate)
    assert detectable_drop(3, 0.1, 0.02, 0.95) is None  # three documents cannot show any drop at 95%


def test_questions_needed_matches_the_normal_approximation():
    """Connor's (1987) sample size for McNemar's test, n = ((z_a √ψ + z_b √(ψ − δ²)) / δ)², within 10% (the
    continuity correction asks a little more)."""
    za, zb = NormalDist().inv_cdf(0.95), NormalDist().inv_cdf(POWER)
    for discordance in (0.1, 0.2):
        approx = ((za * math.sqrt(discordance) + zb * math.sqrt(discordance - 0.02**2)) / 0.02) ** 2
        n = questions_needed(0.02, discordance, 0.0, 0.95)
        assert approx <= n <= 1.1 * approx, (discordance, n, approx)
        assert (
            gate_power(n, 0.02, discordance, 0.0, 0.95)
            >= POWER
            > gate_power(n - 25, 0.02, discordance, 0, 0.95)
        )


@pytest.mark.slow
def test_the_table_in_docs_is_current():
    """docs/gate.md holds the output of `sample_size_table()` (the command to regenerate it is in the file)."""
    doc = (Path(__file__).parent.parent / "docs" / "gate.md").read_text()
    assert sample_size_table() in doc
