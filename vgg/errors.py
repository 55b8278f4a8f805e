"""The one exception type a command line reports as a user's problem.

A `UserError` is expected and fixable by the user (a bad config value, an unusable
dataset, a diverged training, an unreachable server, a full disk): `pipeline/run.py` and
`python -m vgg.ladder` print its message in one line and exit with status 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Mixin base of the errors a user can fix; the message says how."""

    #: Whether the command line keeps the traceback in a file (errors of inputs that were
    #: checked before any work started have nothing more to say than their message).
    keep_traceback = True


class DamagedFile(UserError, ValueError):
    """A file that cannot be read as what it should be (truncated, corrupt): the message
    names the file; `source` the step that made it, where known (e.g. "evaluate/D")."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.source = source
