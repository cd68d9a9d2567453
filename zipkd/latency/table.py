"""The latency table format (versioned JSON) and prediction from it.

Predicted model latency = rest + Σ_layers attention[kv_heads] + Σ_layers mlp[width], where `rest` is the
non-prunable part (embeddings, final norm, lm_head) and entries at 0 are the cost of a removed block."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError
from zipkd.latency.runtimes import runtime_for
from zipkd.models.io import DTYPES
from zipkd.outputs import atomic_write_text

SCHEMA_VERSION = 1
# Fingerprint keys that must match between a table and the model/device it is used for.
MODEL_KEYS = (
    "architecture",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)
DEVICE_KEYS = ("device", "device_name", "torch", "dtype", "threads")


def check_device(device: str) -> str:
    """The device, lower-cased, if it reads `cpu`, `cuda` or `cuda:N` (the format only: whether the GPU exists
    is `zipkd.latency.profile.parse_device`'s check)."""
    text = str(device).strip().lower()
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ZipkdError(f"unknown device {device!r}; choose cpu or cuda (cuda:N)")
    return text


@dataclass
class Regime:
    """What is timed: `prefill` runs batch × seq_len tokens; `decode` one token per sequence over a KV cache
    of `context` tokens."""

    device: str = "cpu"
    regime: str = "prefill"
    batch: int = 1
    seq_len: int = 512
    context: int = 512
    dtype: str = "float32"
    runtime: str = "eager"  # eager | cudagraphs | llama.cpp
    quantization: str | None = None  # torch: a zipkd quantize method; llama.cpp: a GGUF type (q8_0, …)
    threads: int | None = None  # llama.cpp threads (None: all cores)
    decode_tokens: int = 64  # llama.cpp decode: tokens generated after a prompt of `context` tokens

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.dtype not in DTYPES:
            raise ZipkdError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        runtime_for(self.runtime)  # an unknown runtime names the known ones
        if self.runtime == "llama.cpp" and self.quantization is None:
            self.quantization = "q8_0"
        if self.threads is not None and self.threads < 1:
            raise ZipkdError(f"threads must be at least 1 (got {self.threads})")
        if self.decode_tokens < 1:
            raise ZipkdError("decode tokens must be at least 1")
        if self.regime not in ("prefill", "decode"):
            raise ZipkdError(f"unknown regime {self.regime!r}; choose prefill or decode")
        if self.batch < 1:
            raise ZipkdError(f"batch must be at least 1 (got {self.batch})")
        if self.seq_len < 1 or self.context < 1:
            raise ZipkdError("seq-len and context must be at least 1")


@dataclass
class LatencyTable:
    regime: Regime
    fingerprint: dict[str, Any]  # model shape + device (see MODEL_KEYS, DEVICE_KEYS)
    rest_ms: float
    attention_ms: dict[int, float]  # kept KV heads per layer -> ms (0 = block removed)
    mlp_ms: dict[int, float]  # MLP width -> ms (0 = block removed)
    num_layers: int
    measured_dense_ms: float | None = None  # end-to-end dense model, for reference
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Per-layer cost beyond its blocks (call, residual pass-through, overlap of blocks on a GPU). The entries of
    # kept blocks each already carry half of it, so `attention_ms[k] + mlp_ms[w]` alone is exact for layers that
    # keep both blocks and for dropped layers; `layer_ms` adds the other half to a layer that keeps one block.
    layer_overhead_ms: float = 0.0

    @property
    def attention_levels(self) -> list[int]:
        return sorted(self.attention_ms)

    @property
    def mlp_levels(self) -> list[int]:
        return sorted(self.mlp_ms)

    def layer_ms(self, kv_heads: int, width: int) -> float:
        try:
            one_block = (kv_heads == 0) != (width == 0)
            return (
                self.attention_ms[kv_heads]
                + self.mlp_ms[width]
                + (self.layer_overhead_ms / 2 if one_block else 0.0)
            )
        except KeyError as exc:
            raise ZipkdError(
                f"no latency entry for {exc.args[0]} (attention levels {self.attention_levels}, MLP levels "
                f"{self.mlp_levels})"
            ) from None

    def dense_ms(self) -> float:
        """Predicted latency of the unpruned model."""
        return self.rest_ms + self.num_layers * self.layer_ms(max(self.attention_ms), max(self.mlp_ms))

    def predict(self, shapes: Sequence[Any]) -> float:
        """Predicted latency (ms) of a model with these per-layer shapes (LayerShape or dicts); layers
        missing from `shapes` count as removed."""
        total = self.rest_ms
        for s in shapes:
            kv, width = (
                (s["kv_heads"], s["intermediate"]) if isinstance(s, dict) else (s.kv_heads, s.intermediate)
            )
            total += self.layer_ms(kv, width)
        total += (self.num_layers - len(shapes)) * self.layer_ms(0, 0)
        return total

    def predict_speedup(self, shapes: Sequence[Any]) -> float:
        return self.dense_ms() / self.predict(shapes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["attention_ms"] = {str(k): v for k, v in sorted(self.attention_ms.items())}
        d["mlp_ms"] = {str(k): v for k, v in sorted(self.mlp_ms.items())}
        return d

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "latency table") -> LatencyTable:
        """A table from its JSON; `source` names it in errors (a missing field, a negative or non-finite time,
        a table that makes no model faster than another)."""
        if not isinstance(d, dict):
            raise ZipkdError(f"{source} is not a zipkd latency table (expected a JSON object)")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ZipkdError(
                f"{source}: latency table schema {d.get('schema_version')} is not supported (need "
                f"{SCHEMA_VERSION}); re-measure it with `zipkd profile`"
            )
        try:
            tab = cls(
                regime=Regime(**d["regime"]),
                fingerprint=dict(d["fingerprint"]),
                rest_ms=float(d["rest_ms"]),
                attention_ms={int(k): float(v) for k, v in d["attention_ms"].items()},
                mlp_ms={int(k): float(v) for k, v in d["mlp_ms"].items()},
                num_layers=int(d["num_layers"]),
                measured_dense_ms=d.get("measured_dense_ms"),
                meta=d.get("meta", {}),
                layer_overhead_ms=float(d.get("layer_overhead_ms", 0.0)),
            )
        except KeyError as exc:
            raise ZipkdError(
                f"{source} is not a zipkd latency table: it has no {exc.args[0]!r} field"
            ) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ZipkdError(f"{source} is a malformed latency table ({exc})") from None
        tab.check_sane(source)
        return tab

    def check_sane(self, source: str = "latency table") -> None:
        """Every time finite and ≥ 0 (the layer overhead, a difference of timings, only finite), a grid, and a
        positive dense latency: a table that breaks these would make the search promise impossible speedups."""
        if not math.isfinite(self.layer_overhead_ms):
            raise ZipkdError(f"{source} is not a usable latency table: its layer overhead is not finite")
        entries = [("rest", self.rest_ms)]
        entries += [(f"attention {k} KV heads", v) for k, v in self.attention_ms.items()]
        entries += [(f"MLP width {k}", v) for k, v in self.mlp_ms.items()]
        bad = [f"{name} = {v:g} ms" for name, v in entries if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ZipkdError(
                f"{source} is not a usable latency table: times must be finite and ≥ 0 ({', '.join(bad[:3])})"
            )
        if self.num_layers < 1 or not self.attention_ms or not self.mlp_ms:
            raise ZipkdError(f"{source} is not a usable latency table: it has no layers or no grid")
        if not self.dense_ms() > 0:
            raise ZipkdError(f"{source} is not a usable latency table: its dense model takes 0 ms")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        path = Path(path)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ZipkdError(f"latency table {path} not found") from None
        except IsADirectoryError:
            raise ZipkdError(f"latency table {path} is a folder; give the table's .json file") from None
        except (OSError, ValueError) as exc:
            raise ZipkdError(f"cannot read latency table {path}: not JSON ({exc})") from None
        return cls.from_json(data, f"latency table {path}")

    def mismatch(
        self, other_fingerprint: dict[str, Any], keys: Sequence[str] = MODEL_KEYS + DEVICE_KEYS
    ) -> list[str]:
        """Human-readable differences between this table's fingerprint and another (empty = compatible)."""
        out = []
        for k in keys:
            a, b = self.fingerprint.get(k), other_fingerprint.get(k)
            if a is not None and b is not None and a != b:
                out.append(f"{k}: table has {a}, here {b}")
        return out
