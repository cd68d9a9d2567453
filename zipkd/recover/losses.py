"""Pure loss functions for recovery training: masked next-token cross-entropy and logit distillation
(forward KL, reverse KL, or their mean) with a temperature. Functions of tensors only; the training loop
in `train.py` decides which positions they see.

Shapes: `logits`/`teacher_logits` are (N, V) rows already selected at the trained positions (or (B, T, V)
with a (B, T) `mask`); `labels` are the matching next tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KD_MODES = ("none", "forward", "reverse", "mix")


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of `x` (…, V) at the True positions of `mask` (…); all rows when mask is None."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask.bool()]


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `labels` under `logits` over the masked positions (fp32 accumulation)."""
    rows = _select(logits, mask).float()
    targets = labels[mask.bool()] if mask is not None else labels.reshape(-1)
    if rows.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(rows, targets)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) at temperature T, times T² (Hinton et al.) so gradients keep their scale;
    mean over positions. Mass-covering: the student is pushed to put mass wherever the teacher does."""
    s = _select(student_logits, mask).float() / temperature
    t = _select(teacher_logits, mask).float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_student ‖ p_teacher) at temperature T, times T²; mean over positions. Mode-seeking: the student
    concentrates on the teacher's main modes (MiniLLM, Gu et al. 2024)."""
    s = _select(student_logits, mask).float() / temperature
    t = _select(teacher_logits, mask).float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    return kl.mean() * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mode: str,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`forward`, `reverse`, or `mix` (the mean of both) KL; `none` is an error here (the caller skips it)."""
    if mode == "forward":
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if mode == "reverse":
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    if mode == "mix":
        return 0.5 * (
            forward_kl(student_logits, teacher_logits, temperature, mask)
            + reverse_kl(student_logits, teacher_logits, temperature, mask)
        )
    raise ValueError(f"unknown distillation mode {mode!r}; choose one of {', '.join(KD_MODES[1:])}")


def combined_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    mode: str,
    kd_weight: float,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 − w)·CE + w·KD (w = `kd_weight`; CE alone when mode is `none`), and its parts for logging."""
    ce = masked_cross_entropy(student_logits, labels, mask)
    if mode == "none" or teacher_logits is None or kd_weight == 0:
        return ce, {"ce": float(ce.detach())}
    kd = distillation_loss(student_logits, teacher_logits, mode, temperature, mask)
    loss = (1.0 - kd_weight) * ce + kd_weight * kd
    return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}
