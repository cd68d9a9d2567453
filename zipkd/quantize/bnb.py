"""bitsandbytes back end: LLM.int8() (`Linear8bitLt`) and 4-bit NF4/FP4 (`Linear4bit`) linears.

Weights are quantized directly with `bitsandbytes.functional` on the target device and wrapped in the same
module and parameter types transformers' `BitsAndBytesConfig` builds, so a saved folder has transformers'
on-disk layout (`weight` int8 + `SCB`; packed `weight` uint8 + `weight.absmax`, `weight.quant_map`,
`weight.quant_state.bitsandbytes__<type>`) and uniform models also load with stock `from_pretrained`.
Compute runs in the dtype the linear had (float32 on CPU: bf16 4-bit compute is ~4x slower there)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from zipkd.quantize.registry import Backend, Method, owner_of, register

INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (transformers' default `llm_int8_threshold`)
BLOCKSIZE = 64  # 4-bit quantization block (transformers' default)


class _DropCastNotice(logging.Filter):
    """LLM.int8() logs "inputs will be cast from float32 to float16" on every matmul of a float32 model: that is
    how it works (activations are quantized via float16), stated once in the docs, not worth a line per call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in str(record.msg)


def import_bnb() -> Any:
    """Import bitsandbytes without its import-time chatter about optional CPU kernels."""
    quiet = [logging.getLogger(n) for n in ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "root")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        # lazy: a heavy optional back end (3-4 s to import on top of torch); only its methods need it
        import bitsandbytes as bnb
    finally:
        for lg, lvl in zip(quiet, levels, strict=True):
            lg.setLevel(lvl)
    cast_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in cast_logger.filters):
        cast_logger.addFilter(_DropCastNotice())
    return bnb


def is_quantized_module(module: nn.Module) -> bool:
    bnb = import_bnb()
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def _guard_cpu_packing(module: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first eval forward for a fused bf16
    kernel (activations and block scales in bf16); the repacking assumes out_features % 32 == 0 and
    in_features % 64 == 0 and crashes otherwise (pruned widths). Such layers keep the generic path."""
    if module.out_features % 32 or module.in_features % BLOCKSIZE:
        module.support_avx512bf16_for_cpu = False


def dequantize_4bit_flat(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """4-bit weights back to float32 over *flat* blocks, the layout `quantize_4bit` writes on every device."""
    shape = tuple(state.shape)
    n = int(torch.Size(shape).numel())
    q = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack([q >> 4, q & 0xF], dim=-1).reshape(-1)[:n].long()
    absmax = state.absmax
    if state.nested:
        absmax = import_bnb().functional.dequantize_blockwise(absmax, state.state2) + state.offset
    scales = absmax.float().repeat_interleave(state.blocksize)[:n]
    return (state.code.to(q.device).float()[idx] * scales).view(shape)


@functools.cache
def _flat_block_linear4bit() -> type:
    bnb = import_bnb()

    class Linear4bitFlatBlocks(bnb.nn.Linear4bit):
        """`Linear4bit` for in_features that are not a multiple of the block size. bitsandbytes 0.50's native
        CPU dequantization assumes blocks never straddle rows and returns wrong weights for such widths (checked
        in tests); on CPU this class dequantizes over flat blocks instead. Same parameters and saved layout."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            dtype = self.compute_dtype or x.dtype
            w = dequantize_4bit_flat(self.weight.data, self.weight.quant_state).to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            return nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)

    return Linear4bitFlatBlocks


def _linear4bit(
    in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, weights: str
) -> Any:
    cls = import_bnb().nn.Linear4bit if in_features % BLOCKSIZE == 0 else _flat_block_linear4bit()
    return cls(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type=weights,
        device="meta",
    )


def _bias(lin: nn.Linear, device: torch.device) -> nn.Parameter | None:
    if lin.bias is None:
        return None
    return nn.Parameter(lin.bias.data.to(device), requires_grad=False)


def quantize_linear(
    lin: nn.Linear, weights: str, device: torch.device, training: bool | None = None
) -> nn.Module:
    """A bitsandbytes linear computing `lin` with `weights` in int8, nf4 or fp4 (bias kept in full precision).
    `training`: the mode of the new module (default: `lin`'s; LLM.int8() takes another path in training)."""
    bnb = import_bnb()
    w = lin.weight.data.to(device)
    bias = _bias(lin, device)
    if weights == "int8":
        # Row-wise absmax int8 (via float16, as bitsandbytes' own Int8Params does).
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        new = bnb.nn.Linear8bitLt(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    elif weights in ("nf4", "fp4"):
        packed, state = bnb.functional.quantize_4bit(
            w.contiguous(),
            blocksize=BLOCKSIZE,
            compress_statistics=False,
            quant_type=weights,
            quant_storage=torch.uint8,
        )
        new = _linear4bit(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, weights)
        new.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=BLOCKSIZE,
            compress_statistics=False,
            quant_type=weights,
            quant_storage=torch.uint8,
            bnb_quantized=True,
            module=new,
        )
        new.quant_state = state
        _guard_cpu_packing(new)
    else:  # pragma: no cover - guarded by the method table
        raise ValueError(f"bitsandbytes has no {weights!r} weights")
    new.bias = bias
    new.requires_grad_(False)
    new.train(lin.training if training is None else training)
    return new


def load_linear(
    prefix: str,
    state_dict: dict[str, torch.Tensor],
    weights: str,
    in_features: int,
    out_features: int,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Rebuild a saved bitsandbytes linear from its tensors (popped from `state_dict`)."""
    bnb = import_bnb()

    def pop(name: str) -> torch.Tensor:
        try:
            return state_dict.pop(f"{prefix}.{name}")
        except KeyError:
            raise KeyError(f"{prefix}.{name}") from None

    bias_t = state_dict.pop(f"{prefix}.bias", None)
    if weights == "int8":
        cb = pop("weight").to(device)
        scb = pop("SCB").to(device)
        fmt = state_dict.pop(f"{prefix}.weight_format", None)
        if fmt is not None and int(fmt) != 0:
            raise ValueError(f"{prefix}: unsupported int8 weight format {int(fmt)} (only row-major)")
        if cb.dtype != torch.int8 or tuple(cb.shape) != (out_features, in_features):
            raise ValueError(
                f"{prefix}.weight is {cb.dtype} {tuple(cb.shape)}, expected int8 "
                f"({out_features}, {in_features})"
            )
        new = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias_t is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    else:
        data = pop("weight")
        stats = {
            k[len(prefix) + len(".weight.") :]: state_dict.pop(k)
            for k in [k for k in state_dict if k.startswith(f"{prefix}.weight.")]
        }
        if not stats:
            raise KeyError(f"{prefix}.weight.quant_state")
        new = _linear4bit(in_features, out_features, bias_t is not None, compute_dtype, weights)
        new.weight = bnb.nn.Params4bit.from_prequantized(
            data, stats, requires_grad=False, device=device, module=new
        )
        _guard_cpu_packing(new)
        if new.weight.quant_type != weights or tuple(new.weight.quant_state.shape) != (
            out_features,
            in_features,
        ):
            raise ValueError(
                f"{prefix}: saved {new.weight.quant_type} weights of shape "
                f"{tuple(new.weight.quant_state.shape)}, expected {weights} ({out_features}, {in_features})"
            )
    new.bias = (
        None
        if bias_t is None
        else nn.Parameter(bias_t.to(device=device, dtype=compute_dtype), requires_grad=False)
    )
    new.requires_grad_(False)
    return new


def hf_quantization_config(weights: str, compute_dtype: torch.dtype, skip: list[str]) -> dict[str, Any]:
    """transformers' `quantization_config` describing these weights, so stock `from_pretrained` reads them."""
    if weights == "int8":
        cfg = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skip
        )
    else:
        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=weights,
            bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    return cfg.to_dict()


def check(dev: str) -> str | None:
    """Why bitsandbytes cannot run on device type `dev` here (None: it can); ImportError when not installed."""
    bnb = import_bnb()
    if dev == "cuda":
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary  # lazy, as in import_bnb

        if isinstance(bnb.cextension.lib, ErrorHandlerMockBNBNativeLibrary):
            return "bitsandbytes has no CUDA library for this CUDA/torch build"
    return None


def quantize_targets(model: nn.Module, targets: list[str], method: Method, device: torch.device) -> None:
    for name in targets:
        owner, child = owner_of(model, name)
        # The root's mode, not the linear's: surgery leaves freshly sliced linears in training mode.
        lin = quantize_linear(getattr(owner, child), method.weights, device, training=model.training)
        setattr(owner, child, lin)


def load_targets(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    targets: list[str],
    method: Method,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[set[str], set[str]]:
    for n in targets:
        owner, child = owner_of(model, n)
        lin = getattr(owner, child)
        setattr(
            owner,
            child,
            load_linear(n, state_dict, method.weights, lin.in_features, lin.out_features, dtype, device),
        )
    rest = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in state_dict.items()
    }
    result = model.load_state_dict(rest, strict=False, assign=True)
    done = set(targets)  # already built from their own tensors above
    missing = {k for k in result.missing_keys if k.rsplit(".", 1)[0] not in done}
    return missing, set(result.unexpected_keys)


register(
    Backend("bitsandbytes", check, quantize_targets, load_targets),
    Method(
        "bnb-int8",
        "bitsandbytes",
        "int8",
        8,
        ("cpu", "cuda"),
        "LLM.int8(): row-wise absmax int8 weights, outlier input features (>6) in 16-bit",
    ),
    Method(
        "bnb-nf4",
        "bitsandbytes",
        "nf4",
        4,
        ("cpu", "cuda"),
        "NormalFloat4 weights in blocks of 64, compute in the model dtype",
    ),
    Method(
        "bnb-fp4",
        "bitsandbytes",
        "fp4",
        4,
        ("cpu", "cuda"),
        "FP4 (e2m1) weights in blocks of 64, compute in the model dtype",
    ),
)
