"""Read user text/instruction data (.txt, .jsonl, .parquet) and cut calibration batches from it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zipkd.errors import ZipkdError
from zipkd.paths import read_text_file

TEXT_FIELDS = ("text", "content", "passage", "document")


def jsonl_rows(path: Path):
    """(line number, object) for every non-blank line of a JSONL file; errors name the file and the line."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ZipkdError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ZipkdError(f"{path}:{n}: expected a JSON object")
            yield n, row


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file read with pyarrow (no datasets cache, no lock files); a file that is not Parquet
    is one clear error."""
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(0, path.stat().st_size - 4))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise ZipkdError(f"data file {path} is not a Parquet file (no PAR1 header and footer)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise ZipkdError(f"cannot read the Parquet file {path}: {exc}") from None


def _records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [row for _, row in jsonl_rows(path)]
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise ZipkdError(f"{path}: unsupported data format {path.suffix!r} (use .txt, .jsonl or .parquet)")


def load_texts(path: str | os.PathLike) -> list[str]:
    """Documents from a .txt (paragraphs split on blank lines), .jsonl or .parquet file (a text field, or
    instruction + response)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZipkdError(f"data file {path} not found")
    if path.suffix == ".txt":
        docs = [p.strip() for p in read_text_file(path, "data file").split("\n\n")]
        docs = [d for d in docs if d]
    else:
        docs = []
        for n, row in enumerate(_records(path), 1):
            field = next((f for f in TEXT_FIELDS if isinstance(row.get(f), str)), None)
            if field:
                docs.append(row[field])
            elif isinstance(row.get("instruction"), str) and isinstance(row.get("response"), str):
                docs.append(row["instruction"] + "\n" + row["response"])
            else:
                raise ZipkdError(
                    f"{path}:{n}: no text field (one of {', '.join(TEXT_FIELDS)}, or instruction+response)"
                )
    if not docs:
        raise ZipkdError(f"data file {path} is empty")
    return docs


def token_stream(tokenizer: Any, texts: list[str]):
    """Concatenate tokenized documents, separated by EOS, into one 1-D LongTensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def calibration_batch(tokenizer: Any, texts: list[str], n_samples: int, seq_len: int, seed: int):
    """`n_samples` windows of `seq_len` tokens at seeded random offsets of the token stream."""
    if n_samples < 1 or seq_len < 2:
        raise ZipkdError("calibration needs at least 1 sample of at least 2 tokens")
    stream = token_stream(tokenizer, texts)
    if stream.numel() < seq_len:
        raise ZipkdError(
            f"calibration data too short: {stream.numel()} tokens, need at least one window of {seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def parse_weighted(items: Sequence[str], what: str = "text") -> list[tuple[Path, float]]:
    """`PATH` or `PATH:WEIGHT` entries -> (path, weight), the weights normalised to sum to 1 (an entry without a
    weight weighs 1). `what` names the files in errors ("calibration", "mixing text")."""
    out = []
    for item in items:
        path, _, weight = item.rpartition(":")
        try:
            w = float(weight) if path else 1.0
        except ValueError:
            path, w = item, 1.0  # a colon inside the path
        if not path:
            path = item
        if not (w > 0 and w != float("inf")):
            raise ZipkdError(f"{what} weight of {path} must be a positive number (got {weight})")
        out.append((Path(path).expanduser(), w))
    if not out:
        raise ZipkdError(f"give at least one {what} file")
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


def allocate(samples: int, weights: Sequence[float]) -> list[int]:
    """`samples` split by `weights` (largest remainders; every source with weight gets one when it can)."""
    raw = [samples * w for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: samples - sum(counts)]:
        counts[i] += 1
    for i, c in enumerate(counts):
        if c == 0 and samples >= len(counts):
            j = max(range(len(counts)), key=lambda j: counts[j])
            counts[j] -= 1
            counts[i] = 1
    return counts
