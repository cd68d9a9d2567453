"""llama.cpp, the CPU serving engine, through llama-cpp-python: open GGUF models quietly, quantize them with
llama.cpp's own quantizer, time prefill and decode, and score token ids (logits) for perplexity and lm-eval.

Everything here takes token *ids*, so a comparison with torch runs on exactly the same tokens. llama.cpp's own
log lines (hundreds per model load) are routed away; its error lines are kept and quoted in zipkd's errors."""

from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zipkd.errors import ZipkdError
from zipkd.models.gguf_file import GGUF_MAGIC, check_gguf, gguf_header  # noqa: F401  (re-exported)

RUNTIME = "llama.cpp"
# Output types of `zipkd export --quantization`, mapped to llama.cpp's LLAMA_FTYPE_* names. f32 is written
# directly by zipkd; every other type is made by llama.cpp's quantizer from the f32 file.
FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
_ERRORS: deque[str] = deque(maxlen=8)  # llama.cpp's latest error lines, for messages
_LOG_CB = None  # the ctypes callback must stay alive as long as llama.cpp may call it


def parse_ftype(name: str | None) -> str:
    """Normalise a GGUF quantization name (`Q8_0`, `q4_k_m`, `F32`); one clear error for anything else."""
    text = (name or "f32").strip().lower()
    if text not in FTYPES:
        raise ZipkdError(f"unknown GGUF quantization {name!r}; choose one of {', '.join(FTYPES)}")
    return text


def llama_cpp_module():
    """The llama_cpp module with its log routed away; one clear error when it is not installed."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ZipkdError(
            f"llama.cpp is not available here (llama-cpp-python: {exc}); run `make install`, or "
            "`pip install llama-cpp-python==0.3.36` (it compiles llama.cpp, about 6 minutes on 2 cores)"
        ) from None
    _quiet(llama_cpp)
    return llama_cpp


def _quiet(llama_cpp: Any) -> None:
    """Replace llama.cpp's logger: drop its info lines, keep the last error lines for zipkd's messages."""
    global _LOG_CB
    if _LOG_CB is not None:
        return

    def log(level: int, text: bytes | None, _user: Any) -> None:
        if text and level in (3, 4):  # warnings and errors (the enum differs across ggml versions)
            _ERRORS.append(text.decode("utf-8", "replace").strip())

    _LOG_CB = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    try:  # llama-cpp-python re-installs its own callback for each model unless told to stay quiet
        from llama_cpp import _logger

        _logger.set_verbose(False)
    except (ImportError, AttributeError):
        pass


def last_error() -> str:
    """llama.cpp's most telling recent log line: the last that names an error, else the last one."""
    for line in reversed(_ERRORS):
        if "error" in line.lower() and "failed to load model" not in line:
            return line
    return _ERRORS[-1] if _ERRORS else "no message from llama.cpp"


def build_info() -> dict[str, Any]:
    """What identifies the engine in a latency-table fingerprint: package version and llama.cpp's CPU
    features."""
    llama_cpp = llama_cpp_module()
    try:
        system = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 - informational
        system = None
    return {"llama_cpp_python": getattr(llama_cpp, "__version__", None), "llama_cpp_system": system}


def gguf_metadata(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays of numbers come back as lists), read without loading
    any tensor."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(check_gguf(path)))
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if keys is not None and name not in keys:
            continue
        if not field.types:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.STRING:
            out[name] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        elif kind == GGUFValueType.ARRAY:
            sub = field.types[-1] if len(field.types) > 1 else None
            if sub == GGUFValueType.STRING:
                continue  # token lists: large, not needed here
            out[name] = [field.parts[i].tolist()[0] for i in field.data]
        else:
            out[name] = field.parts[field.data[0]].tolist()[0]
    return out


def quantize_gguf(
    src: str | os.PathLike, dst: str | os.PathLike, ftype: str, threads: int | None = None
) -> Path:
    """Quantize a (f32) GGUF with llama.cpp's own quantizer; llama.cpp keeps norms in f32 and falls back to a
    compatible type for tensors whose rows do not fit the type's block size."""
    llama_cpp = llama_cpp_module()
    ftype = parse_ftype(ftype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.nthread = threads or 0
    with _stderr_silenced():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ZipkdError(f"llama.cpp could not quantize {src} to {ftype}: {last_error()}")
    return Path(dst)


@contextmanager
def _stderr_silenced():
    """Some llama.cpp paths print straight to stderr (fd 2); silence them for the duration."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(fd, 2)
    finally:
        os.close(fd)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class EngineModel:
    """An open llama.cpp model. `logits_all` keeps the logits of every position (perplexity, lm-eval)."""

    llm: Any
    path: Path
    threads: int
    prompt_key: tuple | None = None  # the decode-timing prompt now in the KV cache

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def reset(self) -> None:
        self.llm.reset()
        self.prompt_key = None

    def last_logits(self) -> np.ndarray:
        """Logits of the last evaluated position (works without logits_all)."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32)

    def eval(self, ids: Sequence[int]) -> None:
        self.llm.eval(list(map(int, ids)))

    def logits(self, start: int, stop: int) -> np.ndarray:
        """Logits rows for positions [start, stop) of what was evaluated since the last reset."""
        return np.asarray(self.llm.scores[start:stop], dtype=np.float32)

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def close(self) -> None:
        try:
            self.llm.close()
        except Exception:  # noqa: BLE001 - best effort
            pass

    def __enter__(self) -> EngineModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_model(
    path: str | os.PathLike,
    threads: int | None = None,
    n_ctx: int = 2048,
    n_batch: int = 512,
    logits_all: bool = False,
    vocab_only: bool = False,
    kv_f32: bool = False,
) -> EngineModel:
    """Open a GGUF model in llama.cpp (checked first); errors name the file and llama.cpp's own message."""
    llama_cpp = llama_cpp_module()
    path = check_gguf(path)
    threads = threads or default_threads()
    try:
        with _stderr_silenced():
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                vocab_only=vocab_only,
                verbose=False,
                # llama.cpp keeps the KV cache in f16 unless told otherwise; f32 for exact comparisons
                **({"type_k": 0, "type_v": 0} if kv_f32 else {}),
            )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ZipkdError(f"llama.cpp cannot load {path}: {last_error()} ({exc})") from None
    return EngineModel(llm, path, threads)


# ---------------------------------------------------------------- timing


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, max(11, vocab - 10), size=n).tolist()


def time_prefill(em: EngineModel, seq_len: int, seed: int = 0) -> float:
    """Milliseconds to evaluate a prompt of `seq_len` tokens in one batch (from an empty cache)."""
    ids = _ids(seq_len, em.n_vocab, seed)
    em.reset()
    t0 = time.perf_counter()
    em.eval(ids)
    ms = (time.perf_counter() - t0) * 1e3
    em.reset()
    return ms


def time_decode(em: EngineModel, context: int, tokens: int, seed: int = 0) -> float:
    """Milliseconds per generated token: `tokens` single-token steps after a prompt of `context` tokens. The
    prompt is evaluated once and kept in the KV cache; each call rewinds to it (llama.cpp drops the cache
    entries past the rewound position)."""
    ids = _ids(context + tokens, em.n_vocab, seed)
    if em.prompt_key != (context, seed):
        em.reset()
        em.eval(ids[:context])
        em.prompt_key = (context, seed)
    em.llm.n_tokens = context
    t0 = time.perf_counter()
    for tok in ids[context:]:
        em.eval([tok])
    ms = (time.perf_counter() - t0) * 1e3 / tokens
    em.llm.n_tokens = context
    return ms


def timer(regime: str, seq_len: int = 512, context: int = 128, tokens: int = 64):
    """A function EngineModel → ms for the regime: prefill of `seq_len`, or ms per token decoding `tokens`
    tokens after a `context`-token prompt."""
    if regime == "prefill":
        return lambda em: time_prefill(em, seq_len)
    if regime == "decode":
        return lambda em: time_decode(em, context, tokens)
    raise ZipkdError(f"unknown regime {regime!r}; choose prefill or decode")


def context_size(regime: str, seq_len: int, context: int, tokens: int) -> int:
    need = seq_len if regime == "prefill" else context + tokens
    return max(64, need + 8)


def compare(models: Sequence[EngineModel], measure, warmup: int = 1, repeats: int = 5) -> list[list[float]]:
    """Time several open models round-robin (each round measures every model once, so drifts in machine load
    hit all alike); returns the samples (ms) per model."""
    for _ in range(warmup):
        for em in models:
            measure(em)
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, em in enumerate(models):
            samples[i].append(measure(em))
    return samples


# ---------------------------------------------------------------- scoring


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def windows_nll(em: EngineModel, windows: Sequence[Sequence[int]], progress: Any = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and count over token windows, each evaluated from an empty
    cache with its first token as context only: the same windows `zipkd.evaluate.perplexity` scores in torch.
    Needs a model opened with logits_all and n_ctx ≥ the window length."""
    total, count = 0.0, 0
    task = progress.add_task("perplexity (llama.cpp)", total=len(windows)) if progress is not None else None
    for window in windows:
        window = [int(i) for i in window]
        if len(window) < 2:
            continue
        em.reset()
        em.eval(window)
        logp = log_softmax_rows(em.logits(0, len(window) - 1))
        tgt = np.asarray(window[1:])
        total += float(-logp[np.arange(len(tgt)), tgt].sum())
        count += len(tgt)
        if task is not None:
            progress.advance(task)
    em.reset()
    return total, count


def greedy(em: EngineModel, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy continuation of `prompt` by `n` tokens (argmax of the logits, no sampling)."""
    em.reset()
    em.eval(list(prompt))
    out = []
    for _ in range(n):
        nxt = int(np.argmax(em.last_logits()))
        out.append(nxt)
        em.eval([nxt])
    em.reset()
    return out
