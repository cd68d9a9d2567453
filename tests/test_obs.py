"""Structured OBS maths against naive references: explicit inverses recomputed every step, brute-force
least squares for the best single removal. References run in float64, the code under test in float32;
tolerances are relative (rtol 1e-3 on errors, atol 1e-3 on weights of unit scale)."""

from __future__ import annotations

import pytest
import torch

from zipkd.errors import ZipkdError
from zipkd.prune import obs


def _problem(d_out: int = 6, n: int = 12, tokens: int = 64, seed: int = 0, rank: int | None = None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, n, generator=g)
    X = torch.randn(tokens, rank or n, generator=g)
    if rank is not None:  # low-rank inputs: a singular H
        X = X @ torch.randn(rank, n, generator=g)
    X = X * torch.linspace(0.3, 2.0, n)  # uneven channel scales
    H = 2.0 / tokens * X.T @ X
    return W, H


def _damped64(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double()
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)


def _loss(Wnew: torch.Tensor, W: torch.Tensor, Hd: torch.Tensor, G: torch.Tensor | None = None) -> float:
    D = Wnew.double() - W.double()
    Gd = torch.eye(D.shape[0], dtype=torch.float64) if G is None else G.double()
    return float(torch.trace(Gd @ D @ Hd @ D.T))


def _fisher(d_out: int, seed: int = 9) -> torch.Tensor:
    """A random SPD output weighting with uneven directions (like a Fisher of loss gradients)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3 * d_out, d_out, generator=g) * torch.linspace(0.1, 3.0, d_out)
    return A.T @ A / (3 * d_out)


def _naive_refit(W: torch.Tensor, Hd: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Full-width weights with removed columns zero, by an explicit inverse."""
    W = W.double()
    out = torch.zeros_like(W)
    out[:, keep] = W @ Hd[:, keep] @ torch.linalg.inv(Hd[keep][:, keep])
    return out


def _naive_greedy(
    W: torch.Tensor, H: torch.Tensor, group: int, damp: float, G: torch.Tensor | None = None
) -> dict[int, tuple[list[int], float]]:
    """Greedy removal of groups, recomputing the inverse of the live sub-Hessian at every step; scores
    tr(G W_M S⁻¹ W_Mᵀ) with G = I unless given."""
    Hd = _damped64(H, damp)
    Gd = torch.eye(W.shape[0], dtype=torch.float64) if G is None else G.double()
    G = W.shape[1] // group
    live = list(range(G))
    out = {G: (list(live), 0.0)}
    err = 0.0
    while live:
        cols = [c for g in live for c in range(g * group, (g + 1) * group)]
        Wl = _naive_refit(W, Hd, cols)
        Hinv = torch.linalg.inv(Hd[cols][:, cols])
        best, best_score = None, None
        for i, g in enumerate(live):
            m = list(range(i * group, (i + 1) * group))
            S = Hinv[m][:, m]
            WM = Wl[:, [cols[j] for j in m]]
            score = float(torch.trace(Gd @ WM @ torch.linalg.inv(S) @ WM.T))
            if best_score is None or score < best_score:
                best, best_score = g, score
        err += best_score
        live.remove(best)
        out[len(live)] = (list(live), err)
    return out


@pytest.mark.parametrize("chunk", [1])
def test_columns_match_naive_greedy(chunk):
    W, H = _problem()
    ref = _naive_greedy(W, H, 1, 0.01)
    got = obs.obs_prune_columns(W, H, levels=range(13), damp=0.01, chunk=chunk)
    for size in range(1, 13):
        assert got[size].keep.tolist() == sorted(ref[size][0]), size
        assert got[size].error == pytest.approx(ref[size][1], rel=1e-3, abs=1e-5)
    # Removing everything costs the block energy, which the greedy path reaches too.
    assert got[0].error == pytest.approx(ref[0][1], rel=1e-3)
    assert got[0].error == pytest.approx(obs.block_energy(W, obs.damp_hessian(H, 0.01)), rel=1e-5)


def test_groups_match_naive_greedy():
    W, H = _problem(d_out=5, n=16, tokens=80, seed=3)
    ref = _naive_greedy(W, H, 4, 0.01)
    got = obs.obs_prune_groups(W, H, group_size=4, levels=range(5), damp=0.01)
    for size in range(5):
        assert got[size].keep.tolist() == sorted(ref[size][0]), size
        assert got[size].error == pytest.approx(ref[size][1], rel=1e-3, abs=1e-5)


def test_best_single_removal_is_brute_force_optimum():
    W, H = _problem(d_out=4, n=8, tokens=40, seed=5)
    Hd = _damped64(H, 0.01)
    brute = []
    for j in range(8):  # least-squares refit of the other columns, by explicit inverse
        keep = [c for c in range(8) if c != j]
        brute.append(_loss(_naive_refit(W, Hd, keep), W, Hd))
    Hinv = obs.inverse_hessian(H, 0.01)
    scores = obs.group_scores(W, Hinv, torch.arange(8).view(8, 1))
    assert int(torch.argmin(scores)) == min(range(8), key=brute.__getitem__)
    torch.testing.assert_close(
        scores.double(), torch.tensor(brute, dtype=torch.float64), rtol=1e-3, atol=1e-6
    )


def test_update_equals_refit_and_error_is_true_loss():
    W, H = _problem(d_out=6, n=24, tokens=200, seed=7)
    Hd = _damped64(H, 0.01)
    Wk = W.clone()
    Hinv = obs.inverse_hessian(H, 0.01)
    err = 0.0
    for cols in ([3, 4], [10], [0, 17, 20]):
        err += obs.remove_columns(Wk, Hinv, torch.tensor(cols))
    keep = [c for c in range(24) if c not in (3, 4, 10, 0, 17, 20)]
    ref = _naive_refit(W, Hd, keep)
    torch.testing.assert_close(Wk.double(), ref, rtol=1e-3, atol=1e-3)
    assert err == pytest.approx(_loss(ref, W, Hd), rel=1e-3)
    fit = obs.refit_columns(W, obs.damp_hessian(H, 0.01), torch.tensor(keep))
    torch.testing.assert_close(fit.double(), ref[:, keep], rtol=1e-3, atol=1e-3)
    # The same from only H's kept columns and the mean of its diagonal.
    k = torch.tensor(keep)
    fit2 = obs.refit_from_columns(W, H[:, k], k, float(H.diagonal().mean()), 0.01)
    torch.testing.assert_close(fit2.double(), ref[:, keep], rtol=1e-3, atol=1e-3)
    # Without the update, the error is the plain output error of the removed columns.
    plain = W.double().clone()
    plain[:, [3, 4, 10, 0, 17, 20]] = 0
    assert obs.output_error(W, Hd.float(), torch.tensor(keep)) == pytest.approx(_loss(plain, W, Hd), rel=1e-4)
    assert err < _loss(plain, W, Hd)


def test_chunked_removal_close_to_greedy():
    W, H = _problem(d_out=8, n=64, tokens=400, seed=11)
    one = obs.obs_prune_columns(W, H, levels=[48, 32, 16, 0], chunk=1)
    four = obs.obs_prune_columns(W, H, levels=[48, 32, 16, 0], chunk=4)
    for size in (48, 32, 16):
        assert four[size].keep.numel() == size
        # Chunks are a cheaper approximation of the greedy path: errors within 25% of it here.
        assert four[size].error == pytest.approx(one[size].error, rel=0.25)
    assert four[0].error == pytest.approx(one[0].error, rel=1e-6)


def test_singular_hessian_never_gives_nan():
    W, H = _problem(d_out=6, n=32, tokens=10, seed=2, rank=3)  # rank 3 of 32
    H[:, 5] = 0  # a dead input channel
    H[5, :] = 0
    levels = obs.obs_prune_columns(W, H, levels=[24, 8, 1, 0], chunk=1)
    for lv in levels.values():
        assert torch.isfinite(torch.tensor(lv.error))
    Hd = obs.damp_hessian(H, 0.01)
    fit = obs.refit_columns(W, Hd, levels[8].keep)
    assert torch.isfinite(fit).all()
    zero = obs.obs_prune_groups(W, torch.zeros(32, 32), group_size=8, levels=[4, 2, 0])
    assert all(torch.isfinite(torch.tensor(lv.error)) for lv in zero.values())
    with pytest.raises(ZipkdError, match="NaN"):
        obs.inverse_hessian(torch.full((4, 4), float("nan")))


def test_fisher_weighted_greedy_matches_naive():
    W, H = _problem(d_out=6, n=12, tokens=64, seed=4)
    G = _fisher(6)
    ref = _naive_greedy(W, H, 1, 0.01, G)
    got = obs.obs_prune_columns(W, H, levels=range(13), damp=0.01, chunk=1, G=G)
    for size in range(13):
        assert got[size].keep.tolist() == sorted(ref[size][0]), size
        assert got[size].error == pytest.approx(ref[size][1], rel=1e-3, abs=1e-5)
    W2, H2 = _problem(d_out=6, n=16, tokens=80, seed=6)
    ref = _naive_greedy(W2, H2, 4, 0.01, G)
    got = obs.obs_prune_groups(W2, H2, group_size=4, levels=range(5), damp=0.01, G=G)
    for size in range(5):
        assert got[size].keep.tolist() == sorted(ref[size][0]), size
        assert got[size].error == pytest.approx(ref[size][1], rel=1e-3, abs=1e-5)
    # G changes which channels go: the unweighted greedy picks another set at some level here.
    plain = obs.obs_prune_columns(W, H, levels=range(13), damp=0.01, chunk=1)
    assert any(
        plain[s].keep.tolist() != got_s
        for s, got_s in (
            (s, obs.obs_prune_columns(W, H, [s], 0.01, 1, G)[s].keep.tolist()) for s in range(1, 12)
        )
    )


def test_fisher_weighted_error_is_true_weighted_loss():
    """With G ⊗ H the optimal update for removed columns does not depend on G; the score is the G-weighted loss
    of that update, and no other update of the kept columns does better (random perturbations)."""
    W, H = _problem(d_out=5, n=10, tokens=60, seed=8)
    G = _fisher(5, seed=2)
    Hd = _damped64(H, 0.01)
    keep = [0, 2, 3, 5, 8, 9]
    best = _naive_refit(W, Hd, keep)
    Wk, Hinv, GW = W.clone(), obs.inverse_hessian(H, 0.01), G @ W
    err = obs.remove_columns(Wk, Hinv, torch.tensor([1, 4, 6, 7]), GW)
    torch.testing.assert_close(Wk.double(), best, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(GW.double(), G.double() @ best, rtol=1e-3, atol=1e-3)
    assert err == pytest.approx(_loss(best, W, Hd, G), rel=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = best.clone()
        other[:, keep] += 0.05 * torch.randn(5, len(keep), generator=g, dtype=torch.float64)
        assert _loss(other, W, Hd, G) > _loss(best, W, Hd, G)
    assert obs.block_energy(W, Hd.float(), G) == pytest.approx(_loss(torch.zeros_like(W), W, Hd, G), rel=1e-4)
