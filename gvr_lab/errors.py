"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a single line on stderr and exit status 2; everything else is a bug and keeps
its traceback. It subclasses ValueError so library callers can catch the documented exception.
"""


class UsageError(ValueError):
    pass


TYPE_NAMES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}


def coerce(value, kind: type | None, what: str, hint: str = ""):
    """`value` as a `kind`, the one type check of Config fields, method hyper-parameters and
    notebook parameters: an int is accepted for a float (and becomes one), a tuple for a list, a
    bool never for a number; kind None means "a number or None". Anything else is a one-line
    UsageError: "<what> must be <kind>, got <value><hint>"."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is None:
        if value is None or number:
            return value
    elif kind is float and number:
        return float(value)
    elif kind is list and isinstance(value, tuple):
        return list(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    expected = "a number or None" if kind is None else kind.__name__
    raise UsageError(f"{what} must be {expected}, got {value!r}{hint}")


def check_choice(kind: str, value, valid) -> None:
    """Raise a one-line UsageError naming the bad value and the valid choices."""
    if value not in valid:
        raise UsageError(f"unknown {kind} {value!r}; valid: {', '.join(map(str, valid))}")
