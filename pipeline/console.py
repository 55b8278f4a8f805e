"""What reaches the console: the pipeline's own lines; Ray's and MLflow's only with --verbose.

The pipeline's own lines are what the driver prints (`MLflow run ...`, `[3/30] train/A  done
in ...`, the closing summary, the report) and the stages' lines, `  [<stage id>] message`,
which the stages write to stderr, mostly inside Ray workers (a stage's task "stage <id>", Ray
Train's "RayTrainWorker", evaluation share tasks) whose output Ray forwards to the driver.

By default (quiet) the console shows:
- the driver's own lines, as they are;
- the stages' lines forwarded from Ray workers, without Ray's `(RayTrainWorker pid=...)`
  prefix: the stage id in the line says where it comes from;
- anything that signals trouble, with Ray's prefix: warning and error log records, Python
  warnings, exception lines (a traceback condensed to its last line, each such line once,
  with one notice line saying so), fatal lines of Ray's C++ log, the raylet's error reports
  (a worker that died, an OOM kill, an infeasible task), the autoscaler's events. The
  stage's failure itself is the driver's line (and, for an expected error, the log file
  that holds its traceback).

Hidden (from the console only):
- Ray's own driver messages below WARNING (`ray.init(logging_level=...)`), and its warning
  that a new local instance uses token authentication (its default);
- Ray Data's execution plans and progress: in the driver, its "console" log handler at
  WARNING; from workers, their forwarded log lines and progress bars;
- Ray Train's controller and worker messages, and the C++ log lines of Ray's workers (e.g.
  the TrainController's PreemptionWatcher `E` line);
- MLflow's INFO messages (the "mlflow" logger at WARNING, unless MLFLOW_LOGGING_LEVEL is set);
- the raylet's warning that many worker processes started: expected here, a stage's task
  holds no CPU while it waits for its job (`pipeline.scheduler`);
- workers' lines about a full disk: the driver's error line says it, with the space needed.
Nothing of Ray's is lost: every worker's output stays in the session's log directory
(logs/worker-*.out|err, logs/ray-data/, logs/train/, on each node), which one console line
names when Ray starts.

With --verbose (`configure(verbose=True)`) everything is printed as Ray and MLflow print it.

The CLI calls `configure`; `pipeline.runner.connect_ray` calls `prepare_ray` before
`ray.init` (its keyword arguments) and `ray_connected` after it.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys

#: Set by `configure` (the CLI's --verbose): show Ray's and MLflow's own lines too.
VERBOSE = False

#: A stage's line: two spaces, the stage id in brackets, a space (`pipeline.stage.StageContext.log`).
OURS = re.compile(r"^  \[[^\]\s]+\] ")

#: The first line of something that signals trouble.
TROUBLE = re.compile(
    r"^(?:"
    # a log record at WARNING or above, in Ray's, MLflow's or Python's usual formats
    r"\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d\S*\s+(?:WARN|WARNING|ERROR|CRITICAL|FATAL)\b"
    r"|(?:WARN|WARNING|ERROR|CRITICAL|FATAL)\b"  # logging's basic format, `WARNING: ...`
    r"|\[\d{4}-\d\d-\d\d [\d:,.]+ [CF] \d+ \d+\]"  # a fatal line of Ray's C++ log (`E` lines are hidden)
    r"|Traceback \(most recent call last\):"
    r"|During handling of the above exception|The above exception was the direct cause"
    r"|(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Warning)\b"  # an exception's line, `Warning: ...`
    r"|\S+:\d+: \w*Warning: "  # a Python warning: `<file>:<line>: UserWarning: ...`
    r")"
)

#: Raylet reports that are expected here: a stage's task holds no CPU (`pipeline.scheduler`)
#: and waits for its Ray Train / Ray Data job, so Ray starts more workers than it has CPUs.
EXPECTED_RAYLET = re.compile(r"PYTHON worker processes have been started on node")

#: A worker's line about a full disk (ENOSPC, or SQLite's): the driver says it in one line.
DISK_FULL = re.compile(r"No space left on device|\[Errno 28\]|database or disk is full")

_WRAPPED = "_vgg_console_filter"

#: MLflow's SQL store logger: on an OperationalError (a full disk, a locked database) it logs
#: the error with its traceback, then raises it as an MlflowException.
_MLFLOW_DB = "mlflow.store.db.utils"
_MLFLOW_DB_ERROR = re.compile(r"ERROR mlflow\.store\.db\.utils: SQLAlchemy database error")

#: Said once, when the first worker traceback is condensed to its exception's line.
CONDENSED = ("(tracebacks of Ray workers are condensed to their last line here; in full in Ray's logs, "
             "or on the console with --verbose)")


def configure(verbose: bool) -> None:
    """The console policy of this process (the CLI's --verbose). Call it before Ray starts."""
    global VERBOSE
    VERBOSE = verbose
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):  # the user's own MLflow level wins
        import mlflow  # noqa: F401 - importing it configures the "mlflow" logger: set the level after

        logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
        # its ERROR record ("SQLAlchemy database error", with a traceback) always precedes the
        # MlflowException it raises, which the pipeline reports in one line (a full disk, ...)
        logging.getLogger(_MLFLOW_DB).setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    if verbose:
        _ray_data_console(logging.INFO)


def prepare_ray() -> dict:
    """Before `ray.init` in the driver: -> the keyword arguments of `ray.init` for the console
    (quiet: the driver's "ray" logger at WARNING); installs the filter of forwarded lines."""
    if VERBOSE:
        return {}
    install_filter()
    auth = logging.getLogger(_AUTH_LOGGER)
    if not any(isinstance(f, _TokenAuthNotice) for f in auth.filters):
        auth.addFilter(_TokenAuthNotice())
    return {"logging_level": logging.WARNING}


#: Where Ray says which authentication a new local instance uses.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's WARNING that a new local instance uses token authentication: its secure
    default, nothing to act on. (Its warning that authentication is off still shows.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return VERBOSE or not record.getMessage().startswith("Token authentication is enabled")


def ray_connected() -> None:
    """After `ray.init`: quiet Ray Data's console handler in the driver (stages that run in
    this process use it) and say, in one line, where Ray's full logs are."""
    if VERBOSE:
        return
    import ray.data  # noqa: F401 - its import configures the "ray.data" logger: adjust after

    _ray_data_console(logging.WARNING)
    import ray._private.worker as worker

    if not getattr(worker.print_to_stdstream, _WRAPPED, False):
        return  # the workers' lines are not filtered (see install_filter): nothing to point at
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    print(f"Ray's own log lines are hidden (--verbose shows them); Ray's full logs: {ray_logs_dir()}"
          + (" on each node" if nodes > 1 else ""), file=sys.stderr, flush=True)


def ray_logs_dir() -> str:
    """The log directory of the Ray session this process is connected to."""
    try:
        import ray._private.worker

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 - only for a message; Ray's documented default place
        return "/tmp/ray/session_latest/logs"


def _ray_data_console(level: int) -> None:
    """The level of Ray Data's console handler in this process (its file handler, logs/ray-data/,
    keeps every record). A user's own RAY_DATA_LOGGING_CONFIG wins."""
    if "ray.data" not in sys.modules or os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # the handler of Ray Data's default logging config
            handler.setLevel(level)


class LineFilter:
    """Sorts the lines Ray forwards from its workers (one `data` batch of one process: `lines`,
    `pid`, `ip`, ...): -> runs of (lines, ours), in order; ours: a stage's line (printed
    without Ray's prefix), else trouble (printed with it). Other lines are dropped."""

    def __init__(self):
        self._in_traceback: set[tuple] = set()  # (ip, pid) of processes inside a traceback
        self._said: set[str] = set()  # exception lines already shown (quiet: each once)
        self.condensed = False  # whether a traceback was condensed (the notice is due once)

    def split(self, data: dict) -> list[tuple[list[str], bool]]:
        runs: list[tuple[list[str], bool]] = []
        for line in data.get("lines", []):
            kind = self.kind(data, line)
            if kind is None:
                continue
            ours = kind == "ours"
            if runs and runs[-1][1] == ours:
                runs[-1][0].append(line)
            else:
                runs.append(([line], ours))
        return runs

    def kind(self, data: dict, line: str) -> str | None:
        """"ours", "trouble" or None (hidden)."""
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        pid = data.get("pid")
        if pid == "autoscaler":
            return "trouble"  # cluster events (nodes added, requests that cannot be met)
        if pid == "raylet":  # its error reports: a worker died, an OOM kill, an infeasible task
            return None if EXPECTED_RAYLET.search(line) else "trouble"
        if RAY_TQDM_MAGIC in line:
            return None  # a progress bar's update (Ray Data's)
        if OURS.match(line):
            return "ours"
        if DISK_FULL.search(line):
            return None  # the driver's own line names the full disk and what the stage needs
        key = (data.get("ip"), pid)
        if key in self._in_traceback:
            if line[:1].isspace() or not line.strip() or line.startswith(("Traceback (most recent call last):",
                                                                         "During handling of the above",
                                                                         "The above exception was")):
                return None  # the traceback's body: condensed to its exception's line
            self._in_traceback.discard(key)  # the exception's line ends the traceback
            return self._once(line)
        if line.startswith(("Traceback (most recent call last):", "During handling of the above",
                            "The above exception was")):  # a traceback, or the next one of a chain
            self._in_traceback.add(key)
            self.condensed = True
            return None
        if _MLFLOW_DB_ERROR.search(line):
            return None  # the MlflowException it raises is reported (see configure)
        return self._once(line) if TROUBLE.match(line) else None

    def _once(self, line: str) -> str | None:
        """A line of trouble, shown once however many processes (or times) said it: the same
        text without its time stamp and without Ray's "[repeated Nx across cluster]"."""
        text = re.sub(r"\s*(?:\x1b\[\d+m)?\s*\[repeated \d+x across cluster\].*$", "", line)
        text = re.sub(r"^\d{4}[-/]\d\d[-/]\d\d[ T][\d:,.]+\s*", "", text)
        if text in self._said:
            return None
        self._said.add(text)
        return "trouble"


def install_filter() -> bool:
    """Filter what Ray prints of its workers' output in this driver (idempotent). -> whether
    the filter is in place (False: this Ray prints otherwise; then everything is shown).

    Why a filter and not a switch: Ray's only switch for forwarded worker output is all or
    nothing (`ray.init(log_to_driver=False)`, RAY_LOG_TO_DRIVER), which would hide the stages'
    own lines and their failures too; and the libraries' own levels do not reach every line
    (Ray Train's console level is a RunConfig of the training code, Ray's workers write C++
    log lines to stderr, the raylet's reports come through another channel). So this is the
    one place that drops lines: `ray._private.worker.print_to_stdstream`, through which Ray
    prints both the workers' output (the log subscriber's batches) and the raylet's error
    reports. It must be in place before `ray.init`, which binds it. The lines stay in the
    workers' log files."""
    import ray._private.worker as worker

    original = worker.print_to_stdstream
    if getattr(original, _WRAPPED, False):
        return True
    if list(inspect.signature(original).parameters) != ["data", "ignore_prefix"]:
        return False  # not the Ray this was written for: print everything rather than guess
    lines = LineFilter()
    noticed: list[bool] = []  # the notice of condensed tracebacks: once

    def print_to_stdstream(data, ignore_prefix: bool):
        if VERBOSE:
            return original(data, ignore_prefix)
        try:
            runs = lines.split(data)
        except Exception:  # noqa: BLE001 - never lose output (nor Ray's log thread) to the filter
            return original(data, ignore_prefix)
        if lines.condensed and not noticed:
            noticed.append(True)
            print(CONDENSED, file=sys.stderr, flush=True)  # not through Ray (its de-duplication)
        for kept, ours in runs:
            original({**data, "lines": kept}, ignore_prefix=True if ours else ignore_prefix)

    setattr(print_to_stdstream, _WRAPPED, True)
    worker.print_to_stdstream = print_to_stdstream
    return True
