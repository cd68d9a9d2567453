"""Outputs that lose nothing: checked before any work, owned, locked, and written atomically.

- `check_output` refuses, before any work, an output that is an input, lies inside an input or holds one; an
  existing output without `force`; with `force`, a folder that zipkd did not write (only zipkd's own outputs
  and empty folders are ever replaced); and an output whose folder cannot be written.
- `output_lock` makes one process the writer of an output: a second run names the process that holds it and
  stops. The lock is an `flock` on a hidden sibling file, so a killed run leaves no stale lock behind.
- `atomic_dir` / `atomic_write_text` write to a temporary sibling (named after the writing process) and rename
  it into place; temporaries of dead processes are swept on the next write of the same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from zipkd.errors import ZipkdError

# Files that mark a folder as written by zipkd (a model or stage folder, an eval report, a pipeline).
OWNED_MARKERS = ("zipkd.json", "pipeline.json", "report.json")
_HELD: dict[Path, int] = {}  # output -> depth of this process's re-entrant lock on it


def resolve_path(path: str | os.PathLike, what: str = "path") -> Path:
    """`path` made absolute with symlinks resolved; a symlink loop is one clear error."""
    try:
        return Path(path).expanduser().resolve(strict=False)
    except RuntimeError as exc:  # Python < 3.13 raises RuntimeError on loops
        raise ZipkdError(f"{what} {path} is a symlink loop") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ZipkdError(f"{what} {path} is a symlink loop") from None
        raise ZipkdError(f"cannot resolve {what} {path}: {exc.strerror or exc}") from None


def is_zipkd_output(folder: Path) -> bool:
    """Empty, or written by zipkd: a marker file at the top, or only zipkd outputs inside (a pruned family)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries:
        return True
    if any((folder / m).is_file() for m in OWNED_MARKERS):
        return True
    return all(p.is_dir() and any((p / m).is_file() for m in OWNED_MARKERS) for p in entries)


def check_writable(out: Path) -> None:
    """The nearest existing folder at or above `out`'s parent accepts new files (tried, not guessed)."""
    parent = out.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ZipkdError(f"cannot write {out}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".zipkd-write-test-", dir=parent)
    except OSError as exc:
        raise ZipkdError(f"cannot write {out}: {parent} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_apart(out: Path, inputs: tuple[Path, ...]) -> None:
    """`out` is not an input, does not hold one, and does not lie inside an input folder (writing there would
    change the input, and its content hash with it)."""
    for src in inputs:
        src = resolve_path(src, "input")
        if out == src or src.is_relative_to(out):
            raise ZipkdError(f"output {out} would overwrite the input {src}; choose another output")
        if src.is_dir() and out.is_relative_to(src):
            raise ZipkdError(
                f"output {out} lies inside the input {src}, which would change the input; choose an output "
                "outside it"
            )


def check_output(
    out: str | os.PathLike, force: bool, inputs: tuple[Path, ...] = (), kind: str = "folder"
) -> Path:
    """Every refusal that needs no work (see the module docstring); returns the resolved output path.
    `kind`: "folder" (a model, stage or report folder) or "file" (a .gguf, a table)."""
    out = resolve_path(out, "output")
    check_apart(out, inputs)
    if out.exists():
        if not force:
            raise ZipkdError(f"output {out} already exists; pass --force to replace it")
        if kind == "folder" and not out.is_dir():
            raise ZipkdError(f"output {out} exists and is not a folder")
        if kind == "file" and out.is_dir():
            raise ZipkdError(f"output {out} is a folder; give a file name")
        if kind == "folder" and not is_zipkd_output(out):
            raise ZipkdError(
                f"output {out} is a folder that zipkd did not write (no zipkd.json); zipkd replaces only its "
                "own outputs: choose another output or empty it yourself"
            )
    check_writable(out)
    return out


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"process {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, since {since})"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of `out` (re-entrant within this process); refuse when another process holds it.
    A lock of a dead process is free: the kernel releases an flock with its holder."""
    out = resolve_path(out, "output")
    if out in _HELD:
        _HELD[out] += 1
        try:
            yield out
        finally:
            _HELD[out] -= 1
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ZipkdError(
                f"output {out} is being written by {_holder(path)}; wait for it to finish"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: take the new one
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": _command()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    _HELD[out] = 1
    try:
        yield out
    finally:
        del _HELD[out]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _command() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []
    return " ".join(argv)[:200] or "zipkd"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-"


def sweep_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`, `.NAME.PID-*`) that dead processes left
    next to `out`; returns what was removed. Those of live processes are kept."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*"):
        rest = p.name[len(out.name) + 2 :]
        parts = rest.split("-")
        if parts[0] in ("tmp", "old") and len(parts) >= 2:
            pid_text = parts[1]
        elif len(parts) >= 2 and parts[0].isdigit():
            pid_text = parts[0]
        else:
            continue
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def scratch_beside(out: Path) -> Iterator[Path]:
    """A temporary folder next to `out` (same file system, so renaming a result into place is atomic), named
    after this process and removed at the end however the block ends; holds `out`'s lock and first sweeps what
    dead processes left there."""
    with output_lock(out):
        sweep_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name, "tmp"), dir=out.parent))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike, force: bool = False, inputs: tuple[Path, ...] = (), own: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out`, on failure (an error, Ctrl-C or
    SIGTERM) it is removed. Holds `out`'s lock throughout. `own`: `out` is zipkd's by construction (a cache
    entry), replaced without the ownership check."""
    out = resolve_path(out, "output") if own else check_output(out, force, inputs)
    with scratch_beside(out) as scratch:
        tmp = scratch / "new"
        tmp.mkdir()
        yield tmp
        old = scratch / "old"  # the replaced output is moved aside first, deleted with the scratch folder
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
