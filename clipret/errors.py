"""The one exception type that means "the user's input is wrong".

The CLI turns a :class:`ClipretError` into a single line on stderr and exit
code 2. Anything else is a bug and keeps its traceback.
"""


class ClipretError(Exception):
    """Bad input, a missing file, a mismatched artifact: something the user can fix.

    The message is one line and says what to do next.
    """
