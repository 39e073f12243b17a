"""User-facing errors: one line that says what is wrong and where."""


class FusetuneError(Exception):
    """A mistake in the user's config or data. Printed as one line, without a traceback."""
