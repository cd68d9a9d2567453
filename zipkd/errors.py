"""One exception type for problems the user can fix; the CLI prints its message as one line."""


class ZipkdError(Exception):
    """A user-facing error: bad input, missing files, unreachable targets. No traceback is shown."""
