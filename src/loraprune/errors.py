"""The one exception type loraprune raises for anything a user can fix.

The CLI prints its message as a single line on stderr and exits with code 2.
"""


class LoraPruneError(Exception):
    """A problem with the user's input or environment; the message names the fix."""

    exit_code = 2
