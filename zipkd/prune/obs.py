"""Structured Optimal Brain Surgeon: pure functions of tensors (no modules, hooks or data).

A linear layer `y = W x` with inputs x whose second moment is H = 2/N Σ x xᵀ loses
tr(ΔW H ΔWᵀ) (twice the mean squared output error) when its weights change by ΔW. Removing the columns M
(a KV group's o_proj inputs, or one MLP channel's down_proj input) and optimally updating the rest costs

    score(M) = tr(W_M (H⁻¹_MM)⁻¹ W_Mᵀ),
    W   ← W   − W_M (H⁻¹_MM)⁻¹ H⁻¹_{M,:},
    H⁻¹ ← H⁻¹ − H⁻¹_{:,M} (H⁻¹_MM)⁻¹ H⁻¹_{M,:}.

After any sequence of such removals the remaining columns equal the least-squares refit
`refit_columns(W, H, keep)`, so a set of kept columns determines the updated weights. Everything here runs
in float32 (or the dtype given), on whatever device its tensors are on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from zipkd.errors import ZipkdError


@dataclass
class Level:
    """One entry of a block's database: which structures are kept (sorted indices) and the error paid."""

    size: int  # number of kept structures (KV groups or channels)
    keep: torch.Tensor  # LongTensor of kept structure indices, sorted
    error: float  # accumulated tr(ΔW H ΔWᵀ) of removing the others (with the OBS update, if any)


def damp_hessian(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """H + λ·mean(diag H)·I (a new tensor). Dead inputs (zero diagonal) and an all-zero H stay invertible."""
    if not torch.isfinite(H).all():
        raise ZipkdError(
            "the calibration Hessian has NaN or infinite entries (the model overflowed on the data)"
        )
    diag_mean = H.diagonal().mean().item()
    scale = diag_mean if diag_mean > 0 else 1.0
    out = H.clone()
    out.diagonal().add_(max(damp, 1e-8) * scale)
    return out


def _chol(A: torch.Tensor) -> torch.Tensor | None:
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()) or not torch.isfinite(L).all():
        return None
    return L


def inverse_hessian(H: torch.Tensor, damp: float = 0.01, max_tries: int = 8) -> torch.Tensor:
    """(H + λ·mean(diag H)·I)⁻¹ via Cholesky; λ grows tenfold while H stays numerically singular."""
    for _ in range(max_tries):
        Hd = damp_hessian(H, damp)
        L = _chol(Hd)
        if L is not None:
            Hinv = torch.cholesky_inverse(L)
            if torch.isfinite(Hinv).all():
                return Hinv
        damp *= 10
    raise ZipkdError(
        "the calibration Hessian stays singular even with heavy damping; use more calibration data"
    )


def _solve_spd(S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """S⁻¹ B for a (batch of) small SPD S; falls back to a pseudo-inverse when S is numerically singular."""
    L = _chol(S)
    if L is not None:
        return torch.cholesky_solve(B, L)
    return torch.linalg.pinv(S, hermitian=True) @ B


def _inv_spd(S: torch.Tensor) -> torch.Tensor:
    L = _chol(S)
    if L is not None:
        return torch.cholesky_inverse(L)
    return torch.linalg.pinv(S, hermitian=True)


def group_scores(
    W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor, GW: torch.Tensor | None = None
) -> torch.Tensor:
    """score(M) = tr(G W_M (H⁻¹_MM)⁻¹ W_Mᵀ) for each row of `groups` (G × s column indices); `GW` = G·W when
    the output side is weighted by G (None: G = I)."""
    S = Hinv[groups[:, :, None], groups[:, None, :]]  # G × s × s
    WM = W[:, groups].permute(1, 2, 0)  # G × s × d_out
    VM = WM if GW is None else GW[:, groups].permute(1, 2, 0)
    return (VM * _solve_spd(S, WM)).sum(dim=(1, 2))


def remove_columns(
    W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor, GW: torch.Tensor | None = None
) -> float:
    """Remove the columns `cols` together with the OBS update of the others (W, Hinv and GW in place); return
    the score paid. Removed columns of W and rows/columns of Hinv are left exactly zero."""
    Sinv = _inv_spd(Hinv[cols][:, cols])  # (H⁻¹_MM)⁻¹, |M| × |M|
    WM = W[:, cols]  # copies (advanced indexing)
    HM = Hinv[cols, :]
    VM = WM if GW is None else GW[:, cols]
    err = float(((VM @ Sinv) * WM).sum())
    A = Sinv @ HM  # (H⁻¹_MM)⁻¹ H⁻¹_{M,:}
    W.addmm_(WM, A, alpha=-1)
    if GW is not None:
        GW.addmm_(VM, A, alpha=-1)
        GW[:, cols] = 0
    Hinv.addmm_(HM.T, A, alpha=-1)  # H⁻¹ is symmetric: H⁻¹_{:,M} = H⁻¹_{M,:}ᵀ
    W[:, cols] = 0
    Hinv[cols, :] = 0
    Hinv[:, cols] = 0
    return err


def block_energy(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor | None = None) -> float:
    """tr(G W H Wᵀ): the error of removing the whole block (every column)."""
    V = W if G is None else G.to(W.dtype) @ W
    return float(((V @ H) * W).sum())


def output_error(
    W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, G: torch.Tensor | None = None
) -> float:
    """Error of dropping all columns but `keep` *without* updating the others: tr(G W_R H_RR W_Rᵀ)."""
    removed = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    removed[keep.to(W.device)] = False
    idx = removed.nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0.0
    WR = W[:, idx]
    VR = WR if G is None else G.to(W.dtype) @ WR
    return float(((VR @ H[idx][:, idx]) * WR).sum())


def refit_columns(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Least-squares weights of the kept columns: argmin tr((W' − W) H (W' − W)ᵀ) with W'_removed = 0,
    i.e. W_K' = W H_{:,K} (H_KK)⁻¹ — exactly what the OBS updates leave (H should already be damped)."""
    keep = keep.to(W.device)
    HK = H[:, keep]
    rhs = (W @ HK).T  # |K| × d_out
    return _solve_spd(H[keep][:, keep], rhs).T.contiguous()


def refit_from_columns(
    W: torch.Tensor,
    HK: torch.Tensor,
    keep: torch.Tensor,
    diag_mean: float,
    damp: float = 0.01,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """`refit_columns` with the damped H, from only the kept columns H_{:,K} of the undamped H and the mean of
    its diagonal (computing H_{:,K} costs |K|/n of the full H).

    `gram`: where the kept inputs change with the cut (x' instead of x_K), HK is the cross moment 2/N Σ x x'ᵀ
    and `gram` = 2/N Σ x' x'ᵀ; the result minimises ‖W x − W' x'‖² + λ‖W' − W_K‖² (None: x' = x_K, gram = H_KK)."""
    if not torch.isfinite(HK).all():
        raise ZipkdError(
            "the calibration Hessian has NaN or infinite entries (the model overflowed on the data)"
        )
    keep = keep.to(W.device)
    lam = max(damp, 1e-8) * (diag_mean if diag_mean > 0 else 1.0)
    rhs = (W @ HK).add_(W[:, keep], alpha=lam).T  # W (H + λI)_{:,K}, as |K| × d_out
    S = HK[keep].clone() if gram is None else gram.clone()
    S.diagonal().add_(lam)
    for _ in range(8):
        L = _chol(S)
        if L is not None:
            return torch.cholesky_solve(rhs, L).T.contiguous()
        S.diagonal().add_(lam * 9)  # numerically singular: more damping, as inverse_hessian does
        lam *= 10
    raise ZipkdError(
        "the calibration Hessian stays singular even with heavy damping; use more calibration data"
    )


def _levels_desc(levels: Iterable[int], n: int) -> list[int]:
    lv = sorted({int(v) for v in levels if 0 <= int(v) <= n}, reverse=True)
    return lv


def obs_prune_groups(
    W: torch.Tensor,
    H: torch.Tensor,
    group_size: int,
    levels: Sequence[int],
    damp: float = 0.01,
    G: torch.Tensor | None = None,
) -> dict[int, Level]:
    """Greedy structured OBS over contiguous groups of `group_size` columns (KV groups of o_proj).

    Returns a Level for each requested number of kept groups; level 0 (everything removed) costs the block
    energy tr(G W H_d Wᵀ) with the damped H, which the greedy path would also reach. `G` (d_out × d_out) weights
    the output side (e.g. the Fisher of the loss w.r.t. the block output); None means G = I."""
    n = W.shape[1]
    if n % group_size:
        raise ValueError(f"{n} columns do not split into groups of {group_size}")
    n_groups = n // group_size
    W = W.detach().float().clone()
    GW = None if G is None else G.float().to(W.device) @ W
    energy = block_energy(W, damp_hessian(H.float(), damp), G)
    Hinv = inverse_hessian(H.float(), damp)
    groups = torch.arange(n, device=W.device).view(n_groups, group_size)
    alive = torch.ones(n_groups, dtype=torch.bool)
    out: dict[int, Level] = {}
    err = 0.0
    for target in _levels_desc(levels, n_groups):
        if target == 0:
            out[0] = Level(0, torch.zeros(0, dtype=torch.long), energy)
            continue
        while int(alive.sum()) > target:
            idx = alive.nonzero().squeeze(1)
            scores = group_scores(W, Hinv, groups[idx.to(W.device)], GW)
            best = int(idx[int(torch.argmin(scores))])
            err += remove_columns(W, Hinv, groups[best], GW)
            alive[best] = False
        out[target] = Level(target, alive.nonzero().squeeze(1).clone(), err)
    return out


def obs_prune_columns(
    W: torch.Tensor,
    H: torch.Tensor,
    levels: Sequence[int],
    damp: float = 0.01,
    chunk: int = 1,
    G: torch.Tensor | None = None,
) -> dict[int, Level]:
    """Greedy OBS over single columns (MLP channels of down_proj), snapshotting the requested kept counts.

    Each step removes the `chunk` columns with the lowest single-column scores w_j²/H⁻¹_jj jointly (exact
    group update and score; chunk=1 is the classic one-at-a-time greedy). Between levels the matrices are
    compacted to the live columns, so the cost falls as channels go."""
    n = W.shape[1]
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    W = W.detach().float().clone()
    GW = None if G is None else G.float().to(W.device) @ W
    Hd = damp_hessian(H.float(), damp)
    energy = block_energy(W, Hd, G)
    Hinv = inverse_hessian(H.float(), damp)
    live = torch.arange(n, device=W.device)  # original index of each compact column
    out: dict[int, Level] = {}
    err = 0.0
    inf = torch.tensor(float("inf"), device=W.device)
    for target in _levels_desc(levels, n):
        if target == 0:
            out[0] = Level(0, torch.zeros(0, dtype=torch.long), energy)
            continue
        dead = torch.zeros(live.numel(), dtype=torch.bool, device=W.device)
        remaining = live.numel() - target
        while remaining > 0:
            k = min(chunk, remaining)
            d = Hinv.diagonal()
            if bool(((d <= 0) & ~dead).any()):
                # Round-off after many downdates: restart from the exact inverse over the live columns.
                W, Hinv, live, dead, GW = _compact(W, Hinv, live, dead, GW)
                Hinv = inverse_hessian(Hd[live][:, live], 1e-6)
                d = Hinv.diagonal()
            norms = W.square().sum(0) if GW is None else (GW * W).sum(0)
            scores = torch.where(dead, inf, norms / d)
            if k == 1:
                j = int(torch.argmin(scores))
                err += float(scores[j])
                row = Hinv[j].clone().div_(d[j])
                W.addr_(W[:, j].clone(), row, alpha=-1)
                if GW is not None:
                    GW.addr_(GW[:, j].clone(), row, alpha=-1)
                    GW[:, j] = 0
                Hinv.addr_(Hinv[:, j].clone(), row, alpha=-1)
                W[:, j] = 0
                Hinv[j, :] = 0
                Hinv[:, j] = 0
                dead[j] = True
            else:
                cols = torch.topk(scores, k, largest=False).indices
                err += remove_columns(W, Hinv, cols, GW)
                dead[cols] = True
            remaining -= k
        W, Hinv, live, _, GW = _compact(W, Hinv, live, dead, GW)
        out[target] = Level(target, live.cpu(), err)
    return out


def _compact(
    W: torch.Tensor, Hinv: torch.Tensor, live: torch.Tensor, dead: torch.Tensor, GW: torch.Tensor | None
):
    keep = (~dead).nonzero().squeeze(1)
    return (
        W[:, keep].contiguous(),
        Hinv[keep][:, keep].contiguous(),
        live[keep],
        torch.zeros(keep.numel(), dtype=torch.bool, device=W.device),
        None if GW is None else GW[:, keep].contiguous(),
    )
