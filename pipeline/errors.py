"""The one exception type the command line reports as a user's problem.

A `UserError` is expected and fixable by the user (a bad config value, an unusable
dataset, a diverged training, an unreachable server, a full disk): `pipeline/run.py`
prints its message in one line and exits with status 2; the traceback goes to the
log file (or the console with --verbose). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


from vgg.errors import UserError

__all__ = ["UserError", "TrackingServerLost"]


class TrackingServerLost(UserError, ConnectionError):
    """The MLflow tracking server stopped answering during a run."""
