"""Recovery of pruned models: self-data distillation (Thangarasa et al. 2024), fine-tuning with optional logit
distillation, and SLERP merging.

    from zipkd.recover import recover, RecoverConfig, TrainConfig
    recover("pruned/", RecoverConfig(train=TrainConfig(steps=200, kd="forward")), out="recovered/")
"""

from __future__ import annotations

import importlib

_LAZY = {
    "recover": "zipkd.recover.api",
    "RecoverConfig": "zipkd.recover.api",
    "find_teacher": "zipkd.recover.api",
    "TrainConfig": "zipkd.recover.train",
    "train": "zipkd.recover.train",
    "RewriteSettings": "zipkd.recover.data",
    "self_distill": "zipkd.recover.data",
    "load_examples": "zipkd.recover.data",
    "merge": "zipkd.recover.merge",
    "merge_models": "zipkd.recover.merge",
    "slerp": "zipkd.recover.merge",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zipkd.recover' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
