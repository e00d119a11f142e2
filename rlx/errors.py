"""User-facing error type shared by every stage (torch-free).

A `UserError` is a mistake the user can fix (config, data, checkpoint); the CLI prints it as one
line `rlx: error: ...` on stderr and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that says what is wrong and how to fix it."""
