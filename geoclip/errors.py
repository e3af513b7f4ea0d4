"""The one exception type users see: a one-line message that says what to fix."""


class GeoclipError(Exception):
    """A user-facing error: names the file, field or value and what was expected."""
