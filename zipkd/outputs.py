"""Atomic output folders: everything is written to a temporary sibling, then renamed into place.

An interrupted stage leaves no half-written output behind, and an existing output is only replaced with
`force=True` (the old folder is moved aside first and deleted only after the new one is in place).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zipkd.errors import ZipkdError


def check_output(out: str | os.PathLike, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an existing output without --force, and any output that is (or holds) an input."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or src.is_relative_to(out):
            raise ZipkdError(f"output {out} would overwrite the input {src}; choose another output folder")
    if out.exists() and not force:
        raise ZipkdError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ZipkdError(f"output {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out`, on failure it is removed."""
    out = check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
