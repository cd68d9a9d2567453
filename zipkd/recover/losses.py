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


# ------------------------------------------------------------------------------ fused head + loss
# A label probability below fp32's smallest normal number counts as that number: the loss value of such a token
# (a logit more than 87 nats under the row's log-sum-exp) is capped at 87.3; its gradient is exact.
_TINY = torch.finfo(torch.float32).tiny


class _FusedHeadLoss(torch.autograd.Function):
    """(1 − w)·CE + w·KD over the vocabulary without materialising the (N, V) logits: rows are processed in
    chunks; each chunk's student (and teacher) logits are formed from the hidden states, reduced to its loss, and
    its gradient w.r.t. the hidden states (and the head weight, when it trains) is computed right away. The
    backward pass only scales what the forward stored. Exact up to float rounding (tested against
    `combined_loss`); the win is memory traffic: on SmolLM2's 49k vocabulary the unfused softmaxes, exps and
    their backward were about half of a CPU recovery step."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, t_hidden, t_weight, mode, kd_weight, temperature, chunk, scales):
        n = hidden.shape[0]
        s_scale, t_scale = scales
        w = kd_weight if t_hidden is not None and mode != "none" else 0.0
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kd_sum = hidden.new_zeros((), dtype=torch.float32)
        T = float(temperature)
        # Under autocast the matmuls run in its dtype, as autocast would run them, but every operand is cast once
        # here rather than per chunk and per matmul (a frozen head weight is not in autocast's cast cache).
        device = hidden.device.type
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        mm_h = hidden.detach().to(dt) if dt is not None else hidden
        mm_w = weight.detach().to(dt) if dt is not None else weight
        if w > 0 and dt is not None:
            t_hidden, t_weight = t_hidden.to(dt), t_weight.to(dt)
        for i in range(0, n, chunk):
            h = mm_h[i : i + chunk]
            z = F.linear(h, mm_w).float()
            if s_scale != 1.0:
                z.div_(s_scale)
            y = labels[i : i + chunk]
            rows = torch.arange(h.shape[0], device=h.device)
            logp = None
            if w > 0:
                logp = torch.log_softmax(z, dim=-1)
                ce_sum = ce_sum - logp[rows, y].sum()
                g = logp.exp()  # p_s: the CE gradient is p_s − onehot
            else:  # CE alone: one softmax pass, and the log of the labels' probabilities only
                g = torch.softmax(z, dim=-1)
                ce_sum = ce_sum - g[rows, y].clamp_min(_TINY).log().sum()
            g[rows, y] -= 1.0
            if w > 0:
                g.mul_(1.0 - w)
                zt = F.linear(t_hidden[i : i + chunk], t_weight).float()
                if t_scale != 1.0:
                    zt = zt / t_scale
                logps_t = torch.log_softmax(z / T, dim=-1) if T != 1.0 else logp
                logpt_t = torch.log_softmax(zt / T, dim=-1)
                del zt
                ps_t, pt_t = logps_t.exp(), logpt_t.exp()
                diff = logps_t - logpt_t  # log p_s − log p_t
                kd_g = torch.zeros_like(g)
                parts = [("forward", 1.0)] if mode == "forward" else [("reverse", 1.0)]
                if mode == "mix":
                    parts = [("forward", 0.5), ("reverse", 0.5)]
                for kind, share in parts:
                    if kind == "forward":  # KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s); ∂/∂z = (p_s − p_t)/T
                        kd_sum = kd_sum + share * (-(pt_t * diff).sum())
                        kd_g.add_(ps_t - pt_t, alpha=share)
                    else:  # KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t); ∂/∂z = p_s (diff − KL)/T
                        kl = (ps_t * diff).sum(-1, keepdim=True)
                        kd_sum = kd_sum + share * kl.sum()
                        kd_g.add_(ps_t * (diff - kl), alpha=share)
                # the loss is T²·KL of the tempered distributions, its gradient T·(∂KL/∂(z/T))
                g.add_(kd_g, alpha=w * T)
                del kd_g, ps_t, pt_t, diff, logps_t, logpt_t
            g.div_(n * s_scale)
            g = g.to(h.dtype)
            if grad_h is not None:
                grad_h[i : i + chunk] = g @ mm_w
            if grad_w is not None:
                grad_w.add_((g.t() @ h).float())
            del z, logp, g
        ce = ce_sum / max(n, 1)
        kd = kd_sum * T * T / max(n, 1)
        loss = (1.0 - w) * ce + w * kd if w > 0 else ce.clone()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        ce, kd = ce.clone(), kd.clone()
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _g_ce, _g_kd):
        saved = list(ctx.saved_tensors)
        gh = gw = None
        if ctx.has[0]:
            grad_h = saved.pop(0)
            gh = grad_h * grad_loss.to(grad_h.dtype)
        if ctx.has[1]:
            gw = (saved.pop(0) * grad_loss.float()).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None, None


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    mode: str,
    kd_weight: float,
    temperature: float,
    chunk: int = 256,
    scales: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, dict[str, float]]:
    """`combined_loss` of the logits `hidden @ weight.T / scales[0]` (teacher: `teacher_hidden @ teacher_weight.T
    / scales[1]`), computed `chunk` rows at a time (see `_FusedHeadLoss`)."""
    if mode not in KD_MODES:
        raise ValueError(f"unknown distillation mode {mode!r}; choose one of {', '.join(KD_MODES)}")
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero, {"ce": 0.0}
    use_kd = mode != "none" and teacher_hidden is not None and kd_weight > 0
    loss, ce, kd = _FusedHeadLoss.apply(
        hidden,
        weight,
        labels,
        teacher_hidden if use_kd else None,
        teacher_weight if use_kd else None,
        mode,
        float(kd_weight),
        float(temperature),
        int(chunk),
        (float(scales[0]), float(scales[1])),
    )
    parts = {"ce": float(ce)}
    if use_kd:
        parts["kd"] = float(kd)
    return loss, parts
