"""The one exception type for mistakes a user can make (bad paths, bad options, bad checkpoints).

The CLI prints such an error as one line and exits non-zero; anything else is a bug and raises.
"""


class UserError(Exception):
    """A problem with the user's input, reported in one line without a traceback."""
