"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a single line on stderr and exit status 2; everything else is a bug and keeps
its traceback. It subclasses ValueError so library callers can catch the documented exception.
FilesystemError, a kind of it, is a write the filesystem refused.
"""

import errno


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


class FilesystemError(UsageError):
    """A file or folder the lab must write cannot be: a read-only filesystem, no space left, no
    permission, a path that is a file. Not a bug, so the CLI prints it as one line and exits 2;
    `errno` and `reason` say which."""

    def __init__(self, message: str, errno_code: int | None = None, reason: str = ""):
        super().__init__(message)
        self.errno, self.reason = errno_code, reason


# What to do about each failure of the filesystem, by errno.
FILESYSTEM_ADVICE = {
    errno.EROFS: "the filesystem is mounted read-only: choose a location on a writable one",
    errno.ENOSPC: "free some space there or choose another location",
    errno.EDQUOT: "free some of your quota or choose another location",
    errno.EACCES: "choose a location you may write to, or change its permissions",
    errno.EPERM: "choose a location you may write to, or change its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: move it away or choose another location",
    errno.EEXIST: "a file is in the way: move it away or choose another location",
}


def filesystem_error(error: OSError, doing: str, path) -> FilesystemError:
    """The one-line FilesystemError for an OSError met while `doing` ("write", "create the folder")
    `path`: what failed, why, and what to do."""
    reason = (error.strerror or str(error) or type(error).__name__).lower()
    advice = FILESYSTEM_ADVICE.get(error.errno, "choose another location")
    return FilesystemError(f"cannot {doing} {path}: {reason}; {advice}", error.errno, reason)
