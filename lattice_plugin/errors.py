"""Errors the plugin raises for bad input: the CLI prints them as one line and exits non-zero."""


class LatticeError(ValueError):
    """Base class: a user-facing problem with a message that says what to change."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (library errors can span many lines; the CLI prints one)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class LatticeConfigError(LatticeError):
    """An invalid Lattice field in a model config (raised when the config is built).

    The newest one is kept in ``last``: parsers that build configs (jsonargparse for litgpt's recipes) report it
    only as text inside their own error, and the CLI uses ``last`` to print it alone.
    """

    last: "LatticeConfigError | None" = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        LatticeConfigError.last = self


class LatticeCacheError(LatticeError):
    """A request the fixed-slot cache cannot serve (a rewind, a skip, a batch larger than the cache)."""
