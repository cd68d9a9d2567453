"""Fine-tuning data for recovery: instruction/response JSONL, self-data distillation (the teacher rewrites each
response in its own words; a rewrite whose final answer disagrees with the original is dropped in favour of
the original), a content-addressed cache of the distilled set, and tokenization into training sequences whose
loss mask covers the response tokens only.

Thangarasa et al. 2024, "Self-Data Distillation for Recovering Quality in Pruned Large Language Models"."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zipkd.data.text import allocate, jsonl_rows, token_stream
from zipkd.errors import ZipkdError
from zipkd.outputs import atomic_write_text
from zipkd.paths import cache_dir

REWRITE_PROMPT = (
    "Rewrite the answer below in your own words. Keep every reasoning step and the same final answer, and end "
    'with "The answer is ...".\n\nQuestion: {instruction}\n\nAnswer: {response}'
)
MIN_LENGTH_RATIO = (
    0.3  # a rewrite of a long answer (≥ 20 words) shorter than this fraction lost the reasoning
)
PLAIN_TEMPLATE = "Question: {instruction}\nAnswer: "  # for tokenizers without a chat template
CACHE_VERSION = 2


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    source: str = ""


# --------------------------------------------------------------------------------------------------- loading
def load_examples(path: str | os.PathLike) -> list[Example]:
    """Rows of a JSONL file with string fields `instruction` and `response` (`source` optional). Errors name
    the file, the line and the field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZipkdError(f"fine-tuning data {path} not found")
    if path.suffix != ".jsonl":
        raise ZipkdError(f"{path}: fine-tuning data must be JSONL with instruction/response fields")
    rows: list[Example] = []
    for n, row in jsonl_rows(path):
        for key in ("instruction", "response"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                what = "missing" if key not in row else "not a non-empty string"
                raise ZipkdError(f"{path}:{n}: field {key!r} is {what}")
        rows.append(Example(row["instruction"].strip(), row["response"].strip(), str(row.get("source", ""))))
    if not rows:
        raise ZipkdError(f"fine-tuning data {path} is empty (no instruction/response rows)")
    return rows


def select_examples(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of `n` examples (all when n is None or larger), in file order."""
    if n is None or n >= len(examples):
        return list(examples)
    idx = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return [examples[i] for i in idx.tolist()]


def examples_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.instruction, e.response], ensure_ascii=False).encode())
    return h.hexdigest()


def check_same_tokenizer(
    student_tok: Any, teacher_tok: Any, student: str = "student", teacher: str = "teacher"
) -> None:
    """Distillation compares token distributions position by position: the vocabularies must be identical."""
    if student_tok is None or teacher_tok is None:
        raise ZipkdError("recovery needs the tokenizers of both models (one of the folders has none)")
    va, vb = student_tok.get_vocab(), teacher_tok.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise ZipkdError(
            f"the tokenizer of {teacher} differs from that of {student} ({len(vb)} vs {len(va)} "
            f"tokens, {diff} entries differ); teacher and student must share a tokenizer"
        )
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(student_tok, attr, None) != getattr(teacher_tok, attr, None):
            raise ZipkdError(f"the tokenizer of {teacher} has a different {attr} from that of {student}")


# ---------------------------------------------------------------------------------------------- answer check
_ANSWER_RE = re.compile(r"answer is\s*:?\s*(.+?)\s*(?:\.(?:\s|$)|\n|$)", re.IGNORECASE | re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_OPTIONS_RE = re.compile(r"Options:\s*(.+?)\.?\s*$", re.DOTALL)
_RESULT_RE = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")  # "a + b = c": the intermediate result c


def final_answer(text: str) -> str | None:
    """The text after the last "answer is" (up to the end of that sentence), or None."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1].strip().strip("\"'*") if matches else None


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


def _number(text: str) -> float | None:
    m = _NUMBER_RE.fullmatch(text.strip().lstrip("$").rstrip("%").strip())
    return float(m.group().replace(",", "")) if m else None


def parse_options(instruction: str) -> list[str]:
    """Answer options listed as "Options: a; b; c." in the instruction (the default data's MC format)."""
    m = _OPTIONS_RE.search(instruction)
    return [o.strip() for o in m.group(1).split(";") if o.strip()] if m else []


def answers_agree(instruction: str, original: str, rewrite: str) -> tuple[bool, str]:
    """Does the rewrite keep the original's final answer? Numbers (GSM8K) compare as values (the rewrite's
    "answer is" number, else its last number), and the original's intermediate results ("= c") must all
    reappear; option texts (MC sets) must appear in the rewrite's answer and no other option may; free answers
    (NQ) must appear. Originals without an "answer is" are not checkable."""
    if not rewrite.strip():
        return False, "empty"
    orig = final_answer(original)
    if orig is None:
        return True, "unchecked"
    stated = final_answer(rewrite)
    scope = stated if stated is not None else rewrite
    value = _number(orig)
    if value is not None:
        nums = _NUMBER_RE.findall(scope)
        if not nums:
            return False, "no number"
        if float(nums[-1].replace(",", "")) != value:
            return False, "other number"
        # Worked answers: every intermediate result of the original must reappear (a weak teacher often
        # reaches the right number through wrong steps).
        steps = {float(x.replace(",", "")) for x in _RESULT_RE.findall(original)}
        seen = {float(x.replace(",", "")) for x in _NUMBER_RE.findall(rewrite)}
        if not steps <= seen:
            return False, "steps differ"
        return True, "number"
    n_orig, n_scope = _norm(orig), _norm(scope)
    if not _contains(n_scope, n_orig):
        return False, "answer missing"
    for opt in parse_options(instruction):
        n_opt = _norm(opt)
        if n_opt != n_orig and not _contains(n_orig, n_opt) and _contains(n_scope, n_opt):
            return False, "other option"
    return True, "match"


def keeps_substance(original: str, rewrite: str) -> bool:
    """False when a long answer (worked reasoning) was cut down to little more than its final answer."""
    n = len(original.split())
    return n < 20 or len(rewrite.split()) >= MIN_LENGTH_RATIO * n


# --------------------------------------------------------------------------------------- self-distillation
@dataclass(frozen=True)
class RewriteSettings:
    """How the teacher rewrites responses (all of it goes into the cache key)."""

    prompt: str = REWRITE_PROMPT
    max_new_tokens: int = 128
    batch_size: int = 16
    greedy: bool = True

    def __post_init__(self) -> None:
        if "{instruction}" not in self.prompt or "{response}" not in self.prompt:
            raise ZipkdError("the rewrite prompt must contain {instruction} and {response}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ZipkdError("max_new_tokens and the generation batch size must be at least 1")


@dataclass
class DistilledSet:
    examples: list[Example]
    rewritten: list[bool]
    key: str
    stats: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def hash(self) -> str:
        return examples_hash(self.examples)


def distill_cache_key(teacher_hash: str, data_hash: str, settings: RewriteSettings) -> str:
    blob = json.dumps(
        {"v": CACHE_VERSION, "teacher": teacher_hash, "data": data_hash, **asdict(settings)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def distill_cache_dir() -> Path:
    return cache_dir() / "distilled"


def _render_prompt(tokenizer: Any, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return PLAIN_TEMPLATE.format(instruction=text)


def _generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """Greedy batched generation with left padding; (text, finished-with-EOS) per prompt."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        chat = bool(getattr(tokenizer, "chat_template", None))
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
    finally:
        tokenizer.padding_side = side
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    results = []
    for row in new:
        finished = eos is not None and bool((row == eos).any())
        results.append((tokenizer.decode(row, skip_special_tokens=True).strip(), finished))
    return results


def self_distill(
    teacher: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: RewriteSettings,
    teacher_hash: str,
    progress: Any = None,
) -> DistilledSet:
    """Rewrite every response with the teacher, then keep each rewrite only where `judge_rewrite` accepts it.
    The raw generations are cached under a key of (teacher weights, data, prompt, generation settings) and work
    in progress per batch, so reruns and interrupted runs reuse them; the judging is redone on every call."""
    key = distill_cache_key(teacher_hash, examples_hash(examples), settings)
    folder = distill_cache_dir()
    final, partial = folder / f"{key}.json", folder / f"{key}.partial.jsonl"
    cached = _read_cache(final, len(examples))
    if cached is not None:
        generations, gen_s = cached
        return _judge_all(examples, generations, key, gen_s, resumed=len(examples), cached=True)
    done: dict[int, dict[str, Any]] = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            try:
                r = json.loads(line)
                done[int(r["index"])] = {"rewrite": str(r["rewrite"]), "finished": bool(r["finished"])}
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
    folder.mkdir(parents=True, exist_ok=True)
    # Longest originals first, batched by length: a batch stops when its longest rewrite ends.
    lengths = [len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in examples]
    todo = sorted((i for i in range(len(examples)) if i not in done), key=lambda i: (-lengths[i], i))
    resumed = len(examples) - len(todo)
    task = progress.add_task("teacher rewrites", total=len(examples), completed=resumed) if progress else None
    t0 = time.perf_counter()
    with partial.open("a") as log:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            prompts = [
                _render_prompt(
                    tokenizer,
                    settings.prompt.format(
                        instruction=examples[i].instruction, response=examples[i].response
                    ),
                )
                for i in batch
            ]
            budget = min(settings.max_new_tokens, 2 * max(lengths[i] for i in batch) + 24)
            for i, (text, finished) in zip(
                batch, _generate_batch(teacher, tokenizer, prompts, budget), strict=True
            ):
                done[i] = {"rewrite": text, "finished": finished}
                log.write(json.dumps({"index": i, **done[i]}, ensure_ascii=False) + "\n")
            log.flush()
            if task is not None:
                progress.advance(task, len(batch))
    gen_s = round(time.perf_counter() - t0, 1)  # this call's share (resumed rows were generated earlier)
    generations = [done[i] for i in range(len(examples))]
    payload = {
        "version": CACHE_VERSION,
        "key": key,
        "settings": asdict(settings),
        "teacher_hash": teacher_hash,
        "generation_s": gen_s,
        "generations": generations,
    }
    atomic_write_text(final, json.dumps(payload, ensure_ascii=False) + "\n")
    partial.unlink(missing_ok=True)
    return _judge_all(examples, generations, key, gen_s, resumed=resumed, cached=False)


def _read_cache(path: Path, n: int) -> tuple[list[dict[str, Any]], float] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        gens = [{"rewrite": str(g["rewrite"]), "finished": bool(g["finished"])} for g in data["generations"]]
        if data.get("version") == CACHE_VERSION and len(gens) == n:
            return gens, float(data.get("generation_s", 0.0))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a damaged cache entry is rebuilt
    return None


def judge_rewrite(example: Example, rewrite: str, finished: bool) -> tuple[bool, str]:
    """Keep a rewrite only if it ended (not cut by the token budget), keeps the final answer (and, for worked
    numeric answers, the intermediate results) and did not drop the reasoning of a long answer."""
    if not finished:
        return False, "truncated"
    ok, reason = answers_agree(example.instruction, example.response, rewrite)
    if ok and not keeps_substance(example.response, rewrite):
        return False, "too short"
    return ok, reason


def _judge_all(
    examples: Sequence[Example],
    generations: Sequence[dict[str, Any]],
    key: str,
    gen_s: float,
    resumed: int,
    cached: bool,
) -> DistilledSet:
    out, flags, reasons = [], [], {}
    for e, g in zip(examples, generations, strict=True):
        ok, reason = judge_rewrite(e, g["rewrite"], g["finished"])
        reasons[reason] = reasons.get(reason, 0) + 1
        out.append(Example(e.instruction, g["rewrite"] if ok else e.response, e.source))
        flags.append(ok)
    stats = {
        "examples": len(out),
        "rewritten": sum(flags),
        "identical": sum(
            ok and o.response.strip() == e.response.strip()
            for ok, o, e in zip(flags, out, examples, strict=True)
        ),
        "reasons": reasons,
        "generation_s": gen_s,
        "resumed_rows": resumed,
    }
    return DistilledSet(out, flags, key, stats, cached=cached)


# -------------------------------------------------------------------------------------------- tokenization
@dataclass
class TrainSeq:
    """One training sequence: token ids and which of them are trained targets (predicted from the left)."""

    ids: list[int]
    target: list[bool]


def encode_example(tokenizer: Any, example: Example, max_len: int) -> TrainSeq | None:
    """Prompt (chat template where the tokenizer has one) + response + end-of-turn; only the response tokens
    (and the end-of-turn) are targets. Truncated to `max_len`; None when no response token survives."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": example.instruction}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ZipkdError(
                "the tokenizer's chat template does not extend the prompt with the answer; "
                "cannot mask the loss to the response"
            )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    else:
        p_ids = tokenizer(PLAIN_TEMPLATE.format(instruction=example.instruction))["input_ids"]
        r_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_len]
    target = ([False] * len(p_ids) + [True] * len(r_ids))[:max_len]
    if not any(target[1:]):
        return None
    return TrainSeq(ids, target)


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_len: int) -> list[TrainSeq]:
    out = [s for e in examples if (s := encode_example(tokenizer, e, max_len)) is not None]
    if not out:
        raise ZipkdError(f"no training example has a response within {max_len} tokens; raise --max-seq-len")
    return out


def text_windows(
    tokenizer: Any, texts: Sequence[str], max_len: int, limit: int | None = None
) -> list[TrainSeq]:
    """Non-overlapping windows of plain text (every token a target): language-model data that keeps the
    student close to the teacher on prose. Use calibration-role text, never evaluation text."""
    stream = token_stream(tokenizer, list(texts)).tolist()
    n = len(stream) // max_len
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise ZipkdError(f"mixing text too short: {len(stream)} tokens for windows of {max_len}")
    return [TrainSeq(stream[i * max_len : (i + 1) * max_len], [True] * max_len) for i in range(n)]


def mixed_windows(
    tokenizer: Any, sources: Sequence[tuple[Sequence[str], float]], max_len: int, seed: int = 0
) -> list[TrainSeq]:
    """Text windows of several sources in the proportions of their weights (normalised): every source is cut
    into windows (`text_windows`); the pool is as large as the scarcest source allows (its windows / its
    share), and each source contributes a seeded random subset of its windows to it. No window repeats, so
    recovery's epoch-wise shuffles keep the proportions in every epoch. One source: all its windows."""
    if len(sources) == 1:
        return text_windows(tokenizer, sources[0][0], max_len)
    total = sum(w for _, w in sources)
    per = [(text_windows(tokenizer, texts, max_len), w / total) for texts, w in sources]
    pool = min(int(len(windows) / share) for windows, share in per)
    out: list[TrainSeq] = []
    for i, ((windows, _), n) in enumerate(zip(per, allocate(pool, [s for _, s in per]), strict=True)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 104_729 * (i + 1))
        order = torch.randperm(len(windows), generator=gen).tolist()
        out.extend(windows[j] for j in sorted(order[: min(n, len(windows))]))
    return out
