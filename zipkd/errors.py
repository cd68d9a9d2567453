"""One exception type for problems the user can fix; the CLI prints its message as one line.

Exit codes of every command: 0 success; 1 a check failed (the CI gate found a regression); 2 zipkd refused
the input or the request (the same code as a command-line usage error); 130 interrupted (Ctrl-C); 143
terminated (SIGTERM). Outputs are never left half-written whichever way a command ends."""

USER_ERROR = 2
CHECK_FAILED = 1
INTERRUPTED = 130
TERMINATED = 143


class ZipkdError(Exception):
    """A user-facing error: bad input, missing files, unreachable targets. No traceback is shown."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the same cleanup as for Ctrl-C runs (temporary outputs are
    removed, locks released)."""
