"""User-facing error types shared by every stage (torch-free).

A `UserError` is a mistake the user can fix (config, data, checkpoint); the CLI prints it as one
line `rlx: error: ...` on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import os
import tempfile


class UserError(Exception):
    """A problem in the user's input, with a message that says what is wrong and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (damaged, incomplete, unsafe). `resume = "auto"` skips it
    and falls back to an older checkpoint; elsewhere it is a one-line user error."""


def ensure_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Create directory `path` if needed and check that files can be written in it; a UserError
    naming `what` (e.g. "job.output_dir") otherwise. Call before slow work whose output goes there."""
    path = os.fspath(path)
    if not path:
        raise UserError(f"{what} is empty: give a directory to write to")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"{what} '{path}' is not a writable directory ({reason}): choose another or fix its permissions") from None


class PeerStopped(RuntimeError):
    """Another rank of the same job, one this rank exchanges data with, has stopped (exited, crashed or
    was killed). The CLI prints one line and exits with status 1; torchrun stops the remaining ranks."""


class RunStopped(BaseException):
    """The run ended because of a signal (SIGTERM, SIGINT): after the current step and its
    checkpoint, or at once on a second signal. A BaseException, so that it unwinds through
    `except Exception` and the reward scorer; the CLI prints `rlx: <message>` and exits with
    `exit_code` (128 + the signal number: 143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
