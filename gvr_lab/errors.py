"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a single line on stderr and exit status 2; everything else is a bug and keeps
its traceback. It subclasses ValueError so library callers can catch the documented exception.
"""


class UsageError(ValueError):
    pass


def check_choice(kind: str, value, valid) -> None:
    """Raise a one-line UsageError naming the bad value and the valid choices."""
    if value not in valid:
        raise UsageError(f"unknown {kind} {value!r}; valid: {', '.join(map(str, valid))}")
