"""lm-evaluation-harness (the real package) on zipkd's shipped task YAMLs and offline data.

The YAMLs in `zipkd/evaluate/tasks/` name their data file by a placeholder; `materialize_tasks` writes a copy
with this machine's paths (from `zipkd.data.assets.eval_data_path`), which both `run_tasks` (Python API) and
the `lm_eval` command line (`--include_path`) read, so the two score the same documents the same way.

Scoring keeps, per task, which documents were scored and whether each was answered right by the primary metric:
the CI gate (`zipkd.evaluate.gate`) compares two reports document by document."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError

TASK_DIR = Path(__file__).parent / "tasks"
PLACEHOLDER = re.compile(r"@ZIPKD_DATA\((\w+)\)@")
TASK_PREFIX = "zipkd_"
# The metric a task is judged by (retention, the gate, plots), as pruning papers report them (ZipLM,
# SliceGPT): length-normalised accuracy where choices differ much in length. lm-eval's others are kept too.
PRIMARY_METRIC = {
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "winogrande": "acc",
    "boolq": "acc",
    "lambada": "acc",
    "mmlu": "acc",
}


@dataclass
class TaskResult:
    """Scores of one task: every lm-eval metric (and its stderr), the primary one, and how many documents.
    With lm-eval's per-document samples: the documents' ids (in order), `correct` ("1"/"0" per document: right or
    wrong by the primary metric) and `docs_sha256` (a digest of lm-eval's document hashes, so that the same ids
    are known to hold the same documents); None without them (lm-eval's command line writes samples apart)."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    primary: str
    n: int
    doc_ids: list[int] | None = None
    correct: str | None = None
    docs_sha256: str | None = None

    @property
    def score(self) -> float:
        return self.metrics[self.primary]


def available_tasks() -> list[str]:
    """Short names of the shipped tasks (file `zipkd_<name>.yaml`)."""
    return sorted(p.stem.removeprefix(TASK_PREFIX) for p in TASK_DIR.glob(f"{TASK_PREFIX}*.yaml"))


def resolve_tasks(names: Sequence[str]) -> list[str]:
    """Validate task names (short, or with the `zipkd_` prefix); an unknown one lists the available ones."""
    known = available_tasks()
    out: list[str] = []
    for raw in names:
        name = raw.strip().removeprefix(TASK_PREFIX)
        if not name:
            continue
        if name not in known:
            raise ZipkdError(f"unknown task {raw!r}; available tasks: {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ZipkdError(f"no tasks given; available tasks: {', '.join(known)}")
    return out


def materialize_tasks(dest: str | os.PathLike, tasks: Sequence[str] | None = None) -> Path:
    """Write the task YAMLs (placeholders replaced by this machine's data paths) and their helper module into
    `dest`; return it. The folder works as lm-eval's `--include_path`."""
    from zipkd.data.assets import eval_data_path

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = resolve_tasks(tasks) if tasks is not None else available_tasks()
    shutil.copyfile(TASK_DIR / "task_utils.py", dest / "task_utils.py")
    for name in names:
        text = (TASK_DIR / f"{TASK_PREFIX}{name}.yaml").read_text()
        text = PLACEHOLDER.sub(lambda m: str(eval_data_path(m.group(1))), text)
        (dest / f"{TASK_PREFIX}{name}.yaml").write_text(text)
    return dest


@contextmanager
def task_folder(tasks: Sequence[str] | None = None) -> Iterator[Path]:
    """A temporary materialized task folder, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="zipkd-tasks-"))
    try:
        yield materialize_tasks(tmp, tasks)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_results(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, TaskResult]:
    """lm-eval's results dict (`simple_evaluate`, or the JSON its command line writes) -> TaskResult per task."""
    out: dict[str, TaskResult] = {}
    for name in tasks:
        key = TASK_PREFIX + name
        raw = results["results"].get(key)
        if raw is None:
            raise ZipkdError(f"lm-eval returned no result for {key}")
        metrics, stderr = {}, {}
        for k, v in raw.items():
            if "," not in k or not isinstance(v, (int, float)):
                continue
            metric, _filter = k.split(",", 1)
            if metric.endswith("_stderr"):
                stderr[metric.removesuffix("_stderr")] = float(v)
            else:
                metrics[metric] = float(v)
        n_samples = results.get("n-samples", {}).get(key, {})
        n = int(n_samples.get("effective", n_samples.get("original", 0)))
        primary = PRIMARY_METRIC.get(name, "acc")
        samples = results.get("samples", {}).get(key)
        docs = per_document(samples, primary, name) if samples is not None else (None, None, None)
        out[name] = TaskResult(name, metrics, stderr, primary, n, *docs)
    return out


def per_document(samples: Sequence[dict[str, Any]], metric: str, task: str) -> tuple[list[int], str, str]:
    """lm-eval's logged samples of one task -> (doc ids in order, "1"/"0" per document by `metric`, digest of
    the documents' hashes)."""
    rows = sorted(samples, key=lambda s: int(s["doc_id"]))
    values = [float(s[metric]) for s in rows]
    if any(v not in (0.0, 1.0) for v in values):
        raise ZipkdError(f"{task}: lm-eval scored {metric} per document with values other than 0 and 1")
    digest = hashlib.sha256("\n".join(str(s["doc_hash"]) for s in rows).encode()).hexdigest()
    return [int(s["doc_id"]) for s in rows], "".join("1" if v else "0" for v in values), digest


@contextmanager
def _no_git_probe() -> Iterator[None]:
    """lm-eval records `git describe` of the working directory in its results; outside a git repository git
    prints "fatal: not a git repository" on stderr. zipkd never reads that hash: skip the probe for the call."""
    import lm_eval.evaluator as evaluator

    probe = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


def _lm_class() -> Any:
    """lm-eval's HFLM with its tqdm bars replaced by callbacks (zipkd shows one rich progress bar): `on_start`
    gets the number of requests of each request type, `on_rows` the rows of every forward. Scoring is
    unchanged."""
    from lm_eval.models.huggingface import HFLM

    class ReportingHFLM(HFLM):
        on_start: Any = None
        on_rows: Any = None

        def _started(self, requests: Any, kind: str) -> None:
            if self.on_start is not None:
                self.on_start(len(requests), kind)

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self._started(requests, "loglikelihood")
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self._started(requests, "rolling loglikelihood")
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self._started(requests, "generation")
            return super().generate_until(requests, disable_tqdm=True)

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            if self.on_rows is not None:
                self.on_rows(int(inps.shape[0]))
            return out

    return ReportingHFLM


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Any = None,
    label: str = "",
    docs: Sequence[int] | None = None,
) -> dict[str, TaskResult]:
    """Score an in-memory model (any shapes: pruned, heterogeneous) on zipkd tasks with lm-eval's
    `simple_evaluate`. All tasks go through one call, as `lm_eval run --tasks a,b,...` does: lm-eval pools the
    requests of all tasks into the same batches, so the scores are the command line's to the last digit.
    `docs`: score these documents of every task (0-based, instead of the first `limit`), e.g. a development
    slice that a reported evaluation's first documents never overlap."""
    names = resolve_tasks(tasks)
    if batch_size < 1:
        raise ZipkdError(f"batch size must be at least 1 (got {batch_size})")
    lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return evaluate_lm(lm, names, limit=limit, progress=progress, label=label, docs=docs)


def evaluate_lm(
    lm: Any,
    tasks: Sequence[str],
    limit: int | float | None = None,
    progress: Any = None,
    label: str = "",
    docs: Sequence[int] | None = None,
) -> dict[str, TaskResult]:
    """Score any lm-eval `LM` (zipkd's HFLM, or `zipkd.evaluate.llamacpp_lm.LlamaCppLM`) on zipkd tasks in one
    `simple_evaluate` call. The LM may report progress through `on_start(n, kind)` and `on_rows(n)`. `docs`
    (exclusive with `limit`): the documents of every task to score, by 0-based index."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = resolve_tasks(tasks)
    if docs is not None and limit is not None:
        raise ZipkdError("give either a document limit or the documents to score, not both")
    samples = (
        {TASK_PREFIX + n: sorted(set(int(i) for i in docs)) for n in names} if docs is not None else None
    )
    label = f"{label} " if label else ""
    title = f"{label}lm-eval {names[0]}" if len(names) == 1 else f"{label}lm-eval, {len(names)} tasks"
    if progress is not None:
        bar = progress.add_task(title, total=None)
        seen = {"total": 0}

        def on_start(n: int, kind: str) -> None:
            seen["total"] = n
            progress.update(bar, total=n, completed=0)

        def on_rows(rows: int) -> None:
            progress.advance(bar, rows)  # a forward's rows; shared contexts make it end below the total

        lm.on_start, lm.on_rows = on_start, on_rows
    with task_folder(names) as folder, _no_git_probe():
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        results = simple_evaluate(
            model=lm,
            tasks=[TASK_PREFIX + n for n in names],
            task_manager=manager,
            limit=limit,
            samples=samples,
            log_samples=True,  # per-document correctness, for the paired gate
        )
    if progress is not None:
        progress.update(bar, total=seen["total"] or 1, completed=seen["total"] or 1)
    return parse_results(results, names)
