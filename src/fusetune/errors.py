"""User-facing errors: one line that says what is wrong and where."""


class FusetuneError(Exception):
    """A mistake in the user's config or data. Printed as one line, without a traceback."""


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint: one line for the user, and the exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (its type where the message is empty), for a one-line report."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    return f"{type(error).__name__}: {text}"[:200] if with_type else text


def one_line(text, limit: int = 500) -> str:
    """Text (or an exception's message, its type where the message is empty) on one line: whitespace collapsed,
    cut at ``limit`` characters."""
    line = " ".join(str(text).split())
    if not line and isinstance(text, BaseException):
        line = type(text).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
