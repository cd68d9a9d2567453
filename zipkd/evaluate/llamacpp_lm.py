"""Quality in the engine: lm-evaluation-harness tasks and held-out perplexity scored by llama.cpp.

`LlamaCppLM` is an lm-eval `LM` over llama-cpp-python. It tokenizes with the Hugging Face tokenizer zipkd uses
for the same model, exactly as lm-eval's HFLM does in the torch path (`zipkd.evaluate.harness`): the same
context/continuation split, the same left truncation to `max_length`, the same rolling windows, so both score
the same token ids and differ only in the arithmetic of the two engines. llama.cpp only ever sees token ids.

Requests are scored one sequence at a time from llama.cpp's KV cache: they are sorted so that requests with a
common prefix (the choices of one question) are neighbours, and only the tokens after the common prefix are
evaluated."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zipkd.errors import ZipkdError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when a model records no context length
CTX_STEP = 256  # the engine's context grows in steps (each growth reopens the model)


def _lm_base() -> type:
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def hf_tokenizer(path: str | os.PathLike, source: str | os.PathLike | None = None) -> tuple[Any, str]:
    """The Hugging Face tokenizer for a GGUF file, and where it came from: the model folder the file was
    exported from (when zipkd exported it and the folder is still there: the tokenizer zipkd used for the export),
    else the tokenizer stored in the GGUF (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`, as
    `zipkd.models.io.load_model` reads a .gguf)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if source is not None and (Path(source) / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(source)), f"{source} (the model it was exported from)"
        except Exception:  # noqa: BLE001 - fall back to the GGUF's own tokenizer
            pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - the GGUF tokenizer reader raises many types
        raise ZipkdError(f"cannot read the tokenizer stored in {path}: {exc}") from None
    return tok, f"{path.name} (stored in the GGUF)"


def perplexity_windows(
    tokenizer: Any, texts: list[str], max_length: int, max_tokens: int | None
) -> list[list[int]]:
    """The token windows `zipkd.evaluate.perplexity.perplexity` scores: the EOS-joined stream, cut to
    `max_tokens` + 1 tokens, in non-overlapping windows of `max_length`."""
    from zipkd.data.text import token_stream

    stream = token_stream(tokenizer, texts)
    if max_tokens:
        stream = stream[: max_tokens + 1]
    n_windows = (stream.numel() - 1) // max_length
    if n_windows < 1:
        raise ZipkdError(f"evaluation text too short: {stream.numel()} tokens for windows of {max_length}")
    return stream[: n_windows * max_length].view(n_windows, max_length).tolist()


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    z = rows - rows.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaCppLM(_lm_base()):  # type: ignore[misc]
    """lm-eval's LM over llama.cpp: `loglikelihood`, `loglikelihood_rolling`, `generate_until` (greedy).

    `max_length` plays HFLM's role (contexts are left-truncated to it); None: the GGUF's `<arch>.context_length`
    (HFLM's `max_position_embeddings`). The engine itself is opened with a context just large enough for the
    longest request (logits of every position are kept, n_ctx × vocabulary floats). `on_start(n, kind)` and
    `on_rows(n)` report progress as zipkd's HFLM does."""

    backend = "causal"

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Any,
        max_length: int | None = None,
        threads: int | None = None,
        n_batch: int = 512,
    ) -> None:
        super().__init__()
        from zipkd.runtimes.llamacpp import default_threads, gguf_header

        self.path = Path(path)
        header = gguf_header(self.path)
        self.tokenizer = tokenizer
        self.add_bos_token = None  # HFLM's default: the tokenizer's own add_special_tokens behaviour
        arch = header["fields"].get("general.architecture")
        self._max_length = int(
            max_length or header["fields"].get(f"{arch}.context_length") or DEFAULT_MAX_LENGTH
        )
        self.threads = threads or default_threads()
        self.n_batch = n_batch
        self._em: Any = None
        self._cached: list[int] = []  # tokens in the engine's KV cache (with their logits rows)
        self.on_start: Any = None
        self.on_rows: Any = None

    # ------------------------------------------------------------ engine

    def engine(self, need: int) -> Any:
        """The open engine, reopened with a larger context when `need` tokens do not fit."""
        from zipkd.runtimes.llamacpp import open_model

        if self._em is None or self._em.n_ctx < need:
            self.close()
            n_ctx = max(CTX_STEP, -(-need // CTX_STEP) * CTX_STEP)
            self._em = open_model(
                self.path,
                threads=self.threads,
                n_ctx=n_ctx,
                n_batch=min(self.n_batch, n_ctx),
                logits_all=True,
            )
            self._cached = []
        return self._em

    def close(self) -> None:
        if self._em is not None:
            self._em.close()
            self._em = None
            self._cached = []

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_ids(self, ids: Sequence[int]) -> None:
        n_vocab = self._em.n_vocab
        if ids and (max(ids) >= n_vocab or min(ids) < 0):
            raise ZipkdError(
                f"the tokenizer produced token id {max(ids)}, but {self.path.name} has {n_vocab} tokens: "
                "the tokenizer does not belong to this GGUF"
            )

    def _evaluate(self, ids: list[int]) -> None:
        """Make the KV cache hold `ids` (logits rows 0..len-1 valid), evaluating only what is not cached."""
        em = self._em
        p = _common_prefix(self._cached, ids)
        if p == len(ids):
            return  # a prefix of what is cached: its rows are there
        self._check_ids(ids[p:])
        em.llm.n_tokens = p  # llama-cpp-python drops the KV cache from n_tokens on at the next eval
        em.eval(ids[p:])
        self._cached = list(ids)

    # ------------------------------------------------------------ lm-eval interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kw: Any,
    ) -> list[int]:
        """HFLM.tok_encode: the tokenizer's special-token default, off when the text already starts with BOS."""
        from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

        kwargs = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kwargs)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _started(self, n: int, kind: str) -> None:
        if self.on_start is not None:
            self.on_start(n, kind)

    def _rows(self, n: int = 1) -> None:
        if self.on_rows is not None:
            self.on_rows(n)

    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._started(len(requests), "loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = True, **kw: Any
    ) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) of each continuation after its context, truncated from the left
        to `max_length` + 1 tokens as HFLM does (the last token is only a target)."""
        L = self.max_length
        items = []
        for key, ctx, cont in requests:
            if not cont:
                raise ZipkdError("lm-eval asked for the loglikelihood of an empty continuation")
            if len(cont) > L:
                raise ZipkdError(f"a continuation of {len(cont)} tokens does not fit max length {L}")
            items.append((key, (ctx + cont)[-(L + 1) :][:-1], cont))
        if not items:
            return []
        self.engine(max(len(inp) for _, inp, _ in items))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        for i in sorted(range(len(items)), key=lambda j: items[j][1]):  # shared prefixes become neighbours
            key, inp, cont = items[i]
            self._evaluate(inp)
            logp = _log_softmax(self._em.logits(len(inp) - len(cont), len(inp)))
            target = np.asarray(cont)
            ll = float(logp[np.arange(len(cont)), target].sum())
            greedy = bool((logp.argmax(axis=-1) == target).all())
            out[i] = (ll, greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[i])
            self._rows()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows (prefix token, `max_length`, context 1), each summed per document."""
        from lm_eval import utils

        self._started(len(requests), "rolling loglikelihood")
        windows, counts = [], []
        for req in requests:
            (string,) = req.args
            ws = [
                (None, *utils.make_disjoint_window(w))
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows += ws
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows)
        out, at = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[at : at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (argmax; sampling is refused) until a stop sequence, EOS or `max_gen_toks`, the
        context left-truncated to `max_length - max_gen_toks` as HFLM does; stop sequences cut as HFLM does."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
        )

        self._started(len(requests), "generation")
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise ZipkdError("llama.cpp evaluation generates greedily; the task asks for sampling")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ZipkdError(
                    f"the task generates {max_gen} tokens, more than max length {self.max_length}"
                )
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
            out.append(self._greedy_text(ids, max_gen, until))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
            self._rows()
        return out

    def _greedy_text(self, ids: list[int], max_gen: int, until: list[str]) -> str:
        from lm_eval.models.utils import postprocess_generated_text

        return postprocess_generated_text(self.tok_decode(self.greedy(ids, max_gen, until)), until, None)

    def greedy(self, ids: list[int], max_gen: int, until: Sequence[str] = ()) -> list[int]:
        """Greedy continuation of `ids`: argmax tokens until EOS, `max_gen` tokens, or a stop sequence in the
        decoded continuation (HF generate's stop criteria in lm-eval)."""
        self.engine(len(ids) + max_gen)
        self._evaluate(ids)
        seq, new = list(ids), []
        for _ in range(max_gen):
            nxt = int(np.argmax(self._em.logits(len(seq) - 1, len(seq))[0]))
            if nxt == self.eot_token_id:
                break
            new.append(nxt)
            if until and any(s and s in self.tok_decode(new) for s in until):
                break
            seq.append(nxt)
            self._evaluate(seq)
        return new

    # ------------------------------------------------------------ perplexity

    def perplexity(
        self, texts: list[str], max_length: int = 512, max_tokens: int | None = 16384, progress: Any = None
    ) -> dict[str, float]:
        """exp(mean NLL) over the same windows as the torch `perplexity()` (same tokenizer, stream, windows)."""
        import math

        from zipkd.runtimes.llamacpp import windows_nll

        windows = perplexity_windows(self.tokenizer, texts, max_length, max_tokens)
        em = self.engine(max_length)
        self._check_ids([i for w in windows for i in w])
        self._cached = []
        nll, count = windows_nll(em, windows, progress=progress)
        self._cached = []
        return {"perplexity": math.exp(nll / count), "tokens": count, "max_length": max_length}


def run_tasks_llamacpp(
    path: str | os.PathLike,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | float | None = None,
    max_length: int | None = None,
    threads: int | None = None,
    progress: Any = None,
    label: str = "",
) -> dict[str, Any]:
    """Score a GGUF file on zipkd tasks in llama.cpp (all tasks in one `simple_evaluate` call, as `run_tasks`)."""
    from zipkd.evaluate.harness import evaluate_lm

    with LlamaCppLM(path, tokenizer, max_length=max_length, threads=threads) as lm:
        return evaluate_lm(lm, tasks, limit=limit, progress=progress, label=label)
