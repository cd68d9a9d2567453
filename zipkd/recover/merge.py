"""SLERP merging of two models with identical shapes (e.g. two recovered models; Thangarasa et al. 2024
report gains from merging). `slerp` is a pure function of tensors; `merge_models` walks the state dicts."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from zipkd.errors import ZipkdError
from zipkd.models.io import load_model, resolve_model, save_model, tensor_shapes
from zipkd.outputs import check_output
from zipkd.recover.data import check_same_tokenizer

COLINEAR = 0.9995  # |cos| above this: the arc is a line, interpolate linearly (sin θ ≈ 0)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as flat vectors: the angle comes from the normalised
    directions, the weights sin((1−t)θ)/sin θ and sin(tθ)/sin θ apply to the tensors themselves (mergekit's
    convention); t=0 gives `a`, t=1 gives `b`. Computed in float32, returned in `a`'s dtype."""
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na < eps or nb < eps:
        return torch.lerp(a32, b32, t).to(a.dtype)
    dot = torch.clamp((a32.flatten() @ b32.flatten()) / (na * nb), -1.0, 1.0).item()
    if abs(dot) > COLINEAR:
        return torch.lerp(a32, b32, t).to(a.dtype)
    theta = math.acos(dot)
    s = math.sin(theta)
    wa, wb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return (wa * a32 + wb * b32).to(a.dtype)


def check_same_shapes(sd_a: dict[str, Any], sd_b: dict[str, Any], names: tuple[str, str]) -> None:
    """One clear error naming the first difference between two state dicts (tensors, or shapes as tuples)."""
    only_a, only_b = sorted(set(sd_a) - set(sd_b)), sorted(set(sd_b) - set(sd_a))
    if only_a or only_b:
        first = (only_a or only_b)[0]
        where = names[0] if only_a else names[1]
        raise ZipkdError(
            f"cannot merge models with different structure: {first} exists only in {where} "
            f"({len(only_a) + len(only_b)} tensors differ)"
        )
    for k in sd_a:
        shape_a, shape_b = (
            tuple(getattr(sd_a[k], "shape", sd_a[k])),
            tuple(getattr(sd_b[k], "shape", sd_b[k])),
        )
        if shape_a != shape_b:
            raise ZipkdError(
                f"cannot merge models with different shapes: {k} is {shape_a} in {names[0]} and {shape_b} in "
                f"{names[1]}"
            )


def merge_models(model_a: Any, model_b: Any, t: float, names: tuple[str, str] = ("A", "B")) -> Any:
    """SLERP every tensor of `model_b` into `model_a` in place at fraction `t`; returns `model_a`."""
    if not 0.0 <= t <= 1.0:
        raise ZipkdError(f"SLERP fraction must be in [0, 1] (got {t})")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    check_same_shapes(sd_a, sd_b, names)
    done: set[int] = set()  # tied weights (embeddings / LM head) share storage: merge them once
    with torch.no_grad():
        for k, v in sd_a.items():
            if v.data_ptr() in done:
                continue
            done.add(v.data_ptr())
            if v.is_floating_point():
                v.copy_(slerp(v, sd_b[k].to(v.device), t))
            elif not torch.equal(v, sd_b[k].to(v.device)):
                raise ZipkdError(
                    f"cannot merge: non-float tensor {k} differs between {names[0]} and {names[1]}"
                )
    return model_a


def merge(
    a: str | os.PathLike, b: str | os.PathLike, t: float, out: str | os.PathLike, force: bool = False
) -> Path:
    """Load two models, check they have the same shapes and tokenizer, SLERP-merge, save with a manifest."""
    if not 0.0 <= t <= 1.0:
        raise ZipkdError(f"SLERP fraction must be in [0, 1] (got {t})")
    src_a, src_b = resolve_model(a), resolve_model(b)
    out = check_output(out, force, (src_a, src_b))
    if src_a.is_dir() and src_b.is_dir():  # shapes from the file headers, before any weights load
        check_same_shapes(tensor_shapes(src_a), tensor_shapes(src_b), (str(src_a), str(src_b)))
    lm_a, lm_b = load_model(a), load_model(b)
    check_same_tokenizer(lm_a.tokenizer, lm_b.tokenizer, str(lm_a.path), str(lm_b.path))
    merged = merge_models(lm_a.model, lm_b.model, t, (str(lm_a.path), str(lm_b.path)))
    return save_model(
        merged,
        lm_a.tokenizer,
        out,
        stage="merge",
        inputs={"model": lm_a.path, "model_b": lm_b.path},
        config={"method": "slerp", "t": t},
        force=force,
    )
