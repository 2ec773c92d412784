"""The one exception type loraprune raises for anything a user can fix.

The CLI prints its message as a single line on stderr and exits with code 2.
"""


class LoraPruneError(Exception):
    """A problem with the user's input or environment; the message names the fix."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for embedding in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
