"""Weight quantization of any zipkd model (pruned, per-layer widths, or a single decoder layer) with
bitsandbytes (int8, nf4, fp4) or optimum-quanto (int8, int4 weight-only).

`quantize_model(module, method, device)` swaps every plain `nn.Linear` (except `lm_head`; embeddings are not
linears and stay as they are) for its quantized counterpart, in place. `quantize(model, method, out)` does that
to a model folder and saves it with the recipe in `config.json` (`zipkd_quantization`), which
`zipkd.models.io.load_model` reads to rebuild the quantized modules. Quantization buys memory; whether it buys
speed depends on the kernels of the device (on the H200, bitsandbytes nf4/int8 were slower than bf16), so
`quantize` can time the result against the original and records the ratio, slower or not."""

from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from zipkd.errors import ZipkdError
from zipkd.latency.measure import compare_ms
from zipkd.latency.table import Regime
from zipkd.models.io import (
    DTYPES,
    LoadedModel,
    fix_meta_buffers,
    load_model,
    read_config,
    read_state_dict,
    resolve_model,
    save_model,
)
from zipkd.models.surgery import apply_layer_shapes, is_heterogeneous
from zipkd.outputs import check_output

# Each back-end module registers itself (and its methods) in `registry` on import; bitsandbytes and quanto
# themselves are imported only when a method of theirs is used.
from zipkd.quantize import RECIPE_KEY, bnb, quanto  # noqa: F401
from zipkd.quantize.registry import BACKENDS, METHODS, Method

DEFAULT_SKIP = ("lm_head",)


# Short names that are unambiguous; `int8`/`int4` are not (two libraries), so they are refused with a hint.
ALIASES = {"nf4": "bnb-nf4", "fp4": "bnb-fp4", "bnb-4bit": "bnb-nf4", "bnb-8bit": "bnb-int8"}
AMBIGUOUS = {"int8": ("bnb-int8", "quanto-int8"), "int4": ("quanto-int4", "bnb-nf4", "bnb-fp4")}


def canonical_method(name: str) -> str:
    """The method's table name for a name or alias; a clear error for unknown or ambiguous ones."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key in METHODS:
        return key
    if key in AMBIGUOUS:
        raise ZipkdError(
            f"quantization method {name!r} is ambiguous; choose one of {', '.join(AMBIGUOUS[key])}"
        )
    raise ZipkdError(f"unknown quantization method {name!r}; choose one of {', '.join(METHODS)}")


def device_type(device: Any) -> str:
    """'cpu', 'cuda', ... for 'cuda:1', torch.device, etc. (a clear error for nonsense)."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ZipkdError(f"unknown device {device!r}; use cpu or cuda (cuda:N)") from exc


@functools.cache
def backend_problem(backend: str, dev: str) -> str | None:
    """Why `backend` cannot run on device type `dev` here, or None when it can."""
    if dev == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    if dev not in ("cpu", "cuda"):
        return f"zipkd's quantization back ends support cpu and cuda, not {dev}"
    try:
        return BACKENDS[backend].check(dev)
    except ImportError as exc:
        return f"{backend} is not installed ({exc})"


def available_methods(device: str = "cpu") -> list[str]:
    """Methods that run on `device` on this machine (library installed, kernels present, device exists)."""
    dev = device_type(device)
    return [m.name for m in METHODS.values() if dev in m.devices and backend_problem(m.backend, dev) is None]


def resolve_method(name: str, device: str = "cpu") -> Method:
    """The Method for `name`, or a ZipkdError naming the methods that are available on `device`."""
    method = METHODS[canonical_method(name)]
    dev = device_type(device)
    problem = None if dev in method.devices else f"it has no {dev} kernels"
    problem = problem or backend_problem(method.backend, dev)
    if problem:
        avail = available_methods(device)
        raise ZipkdError(
            f"quantization method {method.name} is not available on {device}: {problem}; "
            f"available on {device}: {', '.join(avail) if avail else 'none'}"
        )
    return method


@dataclass
class QuantizeConfig:
    """What to quantize and how; checked on construction. `skip` names linears kept in full precision (matched
    against the last part of a module name or the whole name)."""

    method: str = "bnb-nf4"
    device: str = "cpu"
    skip: tuple[str, ...] = DEFAULT_SKIP
    # dtype of the unquantized parts and of compute; None: float32 on cpu, bfloat16 on cuda
    dtype: str | None = None

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        device_type(self.device)
        self.skip = tuple(self.skip)
        if self.dtype is not None:
            if self.dtype not in DTYPES:
                raise ZipkdError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if device_type(self.device) == "cuda" else "float32")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return name in skip or name.rsplit(".", 1)[-1] in skip


def quantized_modules(module: nn.Module) -> list[str]:
    """Names of bitsandbytes / optimum-quanto modules already inside `module`."""
    libs = ("bitsandbytes.", "optimum.quanto.")
    return [
        name
        for name, sub in module.named_modules()
        if any(c.__module__.startswith(libs) for c in type(sub).__mro__)
    ]


def linear_targets(module: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Names of the plain `nn.Linear` submodules that a method would quantize."""
    return [n for n, m in module.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]


def quantize_model(
    model: nn.Module, method: str | QuantizeConfig, device: str = "cpu", skip: tuple[str, ...] | None = None
) -> nn.Module:
    """Quantize every plain `nn.Linear` of `model` (any module: a whole model, a sliced one, one decoder layer)
    in place, on `device`, except those named in `skip` (default `lm_head`). Returns the module (a new one when
    `model` is itself an `nn.Linear`, whose weights may be released). The model is moved to `device`; compute
    stays in its dtype."""
    cfg = (
        method
        if isinstance(method, QuantizeConfig)
        else QuantizeConfig(method=method, device=device, skip=DEFAULT_SKIP if skip is None else tuple(skip))
    )
    m = resolve_method(cfg.method, cfg.device)
    if isinstance(model, nn.Linear) and type(model) is nn.Linear:
        holder = nn.Module()
        holder.linear = model
        holder.train(model.training)
        return quantize_model(holder, cfg, cfg.device).linear
    done = quantized_modules(model)
    if done:
        raise ZipkdError(
            f"the model is already quantized ({len(done)} quantized modules, e.g. {done[0]}); "
            "quantize the unquantized model instead"
        )
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ZipkdError("the model has weights on the meta device; load its weights before quantizing")
    targets = linear_targets(model, cfg.skip)
    if not targets:
        raise ZipkdError(
            f"nothing to quantize: no nn.Linear layers outside {', '.join(cfg.skip) or 'the skip list'}"
        )
    dev = torch.device(cfg.device)
    model.to(dev)
    dtypes = {model.get_submodule(t).weight.dtype for t in targets}
    BACKENDS[m.backend].quantize(model, targets, m, dev)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        setattr(
            config,
            RECIPE_KEY,
            {
                "method": m.name,
                "backend": m.backend,
                "weights": m.weights,
                "bits": m.bits,
                "modules": targets,
                "skip": list(cfg.skip),
                "compute_dtype": str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else None,
            },
        )
    return model


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, quantized data and scales included (tied tensors once).
    bitsandbytes keeps 4-bit statistics in a `quant_state` outside the parameters: counted too."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        for inner in _inner_tensors(t):
            key = inner.untyped_storage().data_ptr() if inner.device.type != "meta" else id(inner)
            if key in seen:
                continue
            seen.add(key)
            total += inner.untyped_storage().nbytes()

    for t in [*module.parameters(), *module.buffers()]:
        add(t)
    for sub in module.modules():
        state = getattr(getattr(sub, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "as_dict"):
            for v in state.as_dict(packed=False).values():
                if isinstance(v, torch.Tensor):
                    add(v)
        scb = getattr(getattr(sub, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            add(scb)
    return total


def _inner_tensors(t: Any) -> list[Any]:
    """The plain tensors behind a (possibly quanto subclass) tensor."""
    if hasattr(t, "__tensor_flatten__") and type(t).__module__.startswith("optimum."):
        names, _ = t.__tensor_flatten__()
        out = []
        for n in names:
            out.extend(_inner_tensors(getattr(t, n)))
        return out
    return [t]


def disk_bytes(folder: str | os.PathLike) -> int:
    """Size of the weight files (*.safetensors) in a model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


@dataclass
class QuantizeResult:
    """What `quantize` wrote and measured."""

    out: Path
    method: str
    quantized_linears: int
    bytes_before: int
    bytes_after: int
    disk_bytes: int
    seconds: float
    latency: dict[str, Any] = field(default_factory=dict)  # original_ms, quantized_ms, speedup, regime

    @property
    def slower(self) -> bool:
        return bool(self.latency) and self.latency["speedup"] < 1.0


def quantize(
    lm_or_path: LoadedModel | str | os.PathLike,
    method: str | QuantizeConfig,
    out: str | os.PathLike,
    force: bool = False,
    device: str = "cpu",
    measure: Regime | None = None,
    progress: Any = None,
    warmup: int = 1,
    repeats: int = 3,
) -> QuantizeResult:
    """Quantize a model (folder, .gguf, embedded name, or a LoadedModel) and save it to `out` with its recipe.

    With `measure` (a prefill or decode Regime), the original and the quantized model are timed alternately
    on `device` and the ratio is recorded in the manifest, whichever way it goes."""
    cfg = method if isinstance(method, QuantizeConfig) else QuantizeConfig(method=method, device=device)
    src = Path(lm_or_path.path) if isinstance(lm_or_path, LoadedModel) else resolve_model(lm_or_path)
    check_output(out, force, (src,))
    if not isinstance(lm_or_path, LoadedModel) and src.is_dir():
        recipe = read_config(src).get(RECIPE_KEY)
        if recipe:
            raise ZipkdError(
                f"{src} is already quantized ({recipe.get('method')}); quantize the unquantized model instead"
            )
    resolve_method(cfg.method, cfg.device)  # fail before loading anything
    if isinstance(lm_or_path, LoadedModel):
        lm = lm_or_path
    else:
        has_tok = not src.is_dir() or any(
            (src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
        )
        lm = load_model(lm_or_path, dtype=cfg.resolved_dtype, device=cfg.device, tokenizer=has_tok)
    if getattr(lm.model.config, RECIPE_KEY, None):
        raise ZipkdError(
            f"{lm.path} is already quantized ({getattr(lm.model.config, RECIPE_KEY)['method']}); "
            "quantize the unquantized model instead"
        )
    task = (
        progress.add_task(f"quantize {cfg.method}", total=3 if measure else 2)
        if progress is not None
        else None
    )
    original = copy.deepcopy(lm.model) if measure is not None else None
    before = tensor_bytes(lm.model)
    t0 = time.perf_counter()
    model = quantize_model(lm.model, cfg)
    seconds = time.perf_counter() - t0
    after = tensor_bytes(model)
    if task is not None:
        progress.advance(task)
    latency: dict[str, Any] = {}
    if measure is not None:
        orig_t, quant_t = compare_ms([original, model], measure, warmup=warmup, repeats=repeats)
        del original
        latency = {
            "regime": asdict(measure),
            "original_ms": orig_t["median_ms"],
            "quantized_ms": quant_t["median_ms"],
            "speedup": orig_t["median_ms"] / quant_t["median_ms"],
            "repeats": repeats,
        }
        if task is not None:
            progress.advance(task)
    recipe = getattr(model.config, RECIPE_KEY)
    m = METHODS[cfg.method]
    stock = m.backend == "bitsandbytes" and stock_loadable(model, recipe)
    if stock:
        model.config.quantization_config = bnb.hf_quantization_config(
            m.weights, getattr(torch, recipe["compute_dtype"] or "float32"), list(cfg.skip)
        )
    metrics = {
        "quantized_linears": len(recipe["modules"]),
        "tensor_bytes_before": before,
        "tensor_bytes_after": after,
        "quantize_seconds": seconds,
        **({"latency": latency} if latency else {}),
    }
    save = save_model if stock else save_hidden
    saved = save(
        model,
        lm.tokenizer,
        out,
        stage="quantize",
        inputs={"model": lm.path},
        config={**asdict(cfg), "dtype": cfg.resolved_dtype},
        metrics=metrics,
        force=force,
        extra={
            "quantization": {
                "method": m.name,
                "backend": m.backend,
                "weights": m.weights,
                "kept_full_precision": ["embeddings", *cfg.skip, "norms"],
                "loads_with_stock_transformers": stock,
            }
        },
    )
    if task is not None:
        progress.advance(task)
    return QuantizeResult(
        saved, m.name, len(recipe["modules"]), before, after, disk_bytes(saved), seconds, latency
    )


HIDDEN_SUFFIX = ".zipkd.safetensors"


def stock_loadable(model: Any, recipe: dict[str, Any]) -> bool:
    """Whether transformers' own bitsandbytes loader reads this model correctly: uniform layer shapes, and for
    4-bit every quantized width a multiple of the block (bitsandbytes' CPU kernels fail on others)."""
    if is_heterogeneous(model.config):
        return False
    return recipe["weights"] == "int8" or all(
        model.get_submodule(n).in_features % bnb.BLOCKSIZE == 0 for n in recipe["modules"]
    )


def save_hidden(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    stage: str,
    inputs: dict[str, Any],
    config: Any,
    metrics: dict[str, Any],
    extra: dict[str, Any],
    force: bool = False,
) -> Path:
    """`save_model` for folders transformers cannot read correctly: the weight files get a `.zipkd.safetensors`
    suffix, so stock `from_pretrained` fails with "no model.safetensors" instead of silently loading quantized
    tensors into plain linears (it does that with quanto's when they are named model.safetensors). zipkd's
    loader reads them."""
    return save_model(
        model,
        tokenizer,
        out,
        stage,
        inputs=inputs,
        config=config,
        metrics=metrics,
        extra=extra,
        force=force,
        weights_suffix=HIDDEN_SUFFIX,
    )


def load_quantized(folder: str | os.PathLike, dtype: Any, device: str = "cpu") -> nn.Module:
    """Rebuild a model saved by `quantize` (any zipkd shape) from its recipe: build the architecture on the meta
    device, swap in quantized modules from the saved tensors, load the rest."""

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    recipe = getattr(config, RECIPE_KEY)
    name = recipe.get("method")
    if name not in METHODS:
        raise ZipkdError(f"{folder} was quantized with {name!r}, which this zipkd does not know")
    m = resolve_method(name, device)
    hf_qcfg = getattr(config, "quantization_config", None)
    if hf_qcfg is not None:
        del config.quantization_config  # rebuilt by zipkd below, not by transformers' quantizer
    dev = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if is_heterogeneous(config):
        apply_layer_shapes(model, config.zipkd_layers)
    fix_meta_buffers(model)  # rotary buffers are not saved: rebuild them before anything materialises them
    sd = read_state_dict(folder)
    names = list(recipe["modules"])
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise ZipkdError(
                f"{folder}: quantized module {n} is not in the model its config describes"
            ) from None
    try:
        missing, unexpected = BACKENDS[m.backend].load(model, sd, names, m, dtype, dev)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ZipkdError(f"quantized weights in {folder} do not match its recipe: {exc}") from exc
    if config.tie_word_embeddings:
        missing = {k for k in missing if not k.endswith("lm_head.weight")}
    if missing or unexpected:
        raise ZipkdError(
            f"weights in {folder} do not match its config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for buf_owner in model.modules():  # rebuilt rotary buffers live on the cpu
        for bname, buf in list(buf_owner.named_buffers(recurse=False)):
            if buf.device != dev:
                setattr(buf_owner, bname, buf.to(dev))
    if hf_qcfg is not None:
        model.config.quantization_config = hf_qcfg
    return model.eval()
