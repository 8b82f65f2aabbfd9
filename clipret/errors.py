"""The one exception type that means "the user's input is wrong".

The CLI turns a :class:`ClipretError` into a single line on stderr and exit
code 2. Anything else is a bug and keeps its traceback.
"""


class ClipretError(Exception):
    """Bad input, a missing file, a mismatched artifact: something the user can fix.

    The message is one line and says what to do next.
    """


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), cut to ``limit``."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
