"""MLflow's UI in a real browser: `mlflow ui` on 127.0.0.1 and headless Chromium.

Used by the browser test in tests/test_e2e.py and by docs/screenshots.py (the README's
screenshots), so that what the test checks and what the README shows come the same way.

What MLflow 3.17's React UI needs (found by trying, on 3.17.2):

* `chromium --headless --dump-dom` with `--virtual-time-budget=<ms>`: the page's own
  timers run on virtual time, which stands still while requests are in flight, so the
  dump comes after the API answers and the render. The runs table is an ag-grid that
  renders only the rows and columns in the window: a big window renders them all.
* A fresh profile (`--user-data-dir`) per page: the UI keeps state in localStorage, in
  particular the sidebar's "GenAI | Model training" switch (`mlflow.workflowType`,
  default GenAI). The experiment's `mlflow.experimentKind` tag does not choose that view
  in 3.17; `?workflowType=machine_learning` in the (hash) route does.
* `MLflow Assistant` opens itself on the first page load when the page's host is
  localhost or 127.0.0.1. `serve_mlflow_ui(alias=...)` serves the UI under another host
  name (mapped to 127.0.0.1 inside Chromium only; the server still listens on 127.0.0.1)
  and the panel stays closed: what a user sees who closed it, or a colleague on the head
  node's address.
"""

from __future__ import annotations

import asyncio
import html.parser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlsplit

#: Debian's package is `chromium`; other names where the binary is called differently.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: The window of every page: wide enough for the runs table's default columns, tall
#: enough for a dozen stage runs.
WINDOW = (1600, 1000)

#: Virtual time for a page; enough here (2 cores, a pipeline running) by a wide margin.
BUDGET_MS = 20_000

#: The runs view of the UI (not the GenAI overview), see the module docstring.
MODEL_TRAINING = "workflowType=machine_learning"

LOOPBACK = ("127.0.0.1", "localhost")


def chromium_path() -> str | None:
    """The Chromium binary: $CHROMIUM, else the first of CHROMIUM_NAMES on PATH; None if absent."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env)
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def local_store_uri(uri: str) -> str:
    """The URI `mlflow ui --backend-store-uri` gets: a SQLite URI without its query
    (`?timeout=60` is for the pipeline's concurrent writers; the UI only reads)."""
    return uri.split("?", 1)[0] if uri.startswith("sqlite:") else uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_mlflow_ui(backend_store_uri: str, *, alias: str | None = None, wait_s: float = 180.0,
                    log: str | Path | None = None) -> Iterator[str]:
    """`mlflow ui` on 127.0.0.1 at a free port over `backend_store_uri`; yields the base URL
    (`http://127.0.0.1:<port>`, or `http://<alias>:<port>` with `alias`, which the server
    then accepts as its host and CORS origin). Waits for /health; stops the server (its
    process group, by pid) on exit. The server's output goes to `log` (else a temporary file,
    whose tail is in the error if the server does not come up)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", local_store_uri(backend_store_uri),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if alias:
        cmd += ["--allowed-hosts", f"{alias}:{port}", "--cors-allowed-origins", f"http://{alias}:{port}"]
    # no job runner (a dozen huey consumers, for GenAI scorers): the pages here need none
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(log) if log else Path(tmp) / "mlflow-ui.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=tmp, start_new_session=True)
        try:
            _wait_healthy(proc, f"http://127.0.0.1:{port}/health", wait_s, log_path)
            yield f"http://{alias or '127.0.0.1'}:{port}"
        finally:
            _stop(proc)


#: urllib without the environment's proxies (the server is on 127.0.0.1).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_healthy(proc: subprocess.Popen, url: str, wait_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with _DIRECT.open(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow ui did not answer {url} within {wait_s:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.5)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the mlflow CLI and uvicorn under it), up to
    15 s for the CLI to exit, then SIGKILL to whatever of the group is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ------------------------------------------------------------------ routes


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's page, in the model-training view (it opens on its runs)."""
    return f"{base}/#/experiments/{experiment_id}?{MODEL_TRAINING}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, flat and sorted by run name: sorted by anything but
    the start time, the table lists child runs as rows of their own instead of folding
    them under their (collapsed) parent."""
    order = quote("tags.`mlflow.runName`")
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}&orderByKey={order}&orderByAsc=true"


def run_url(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page (Overview: datasets, metrics with their models, tags), or with
    `artifact` its Artifacts tab with that file open (a `mlflow.log_table` JSON as a table)."""
    tab = f"/artifacts/{artifact}" if artifact else ""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}{tab}?{MODEL_TRAINING}"


def model_url(base: str, experiment_id: str, model_id: str) -> str:
    """A logged model's page (MLflow 3)."""
    return f"{base}/#/experiments/{experiment_id}/models/{model_id}?{MODEL_TRAINING}"


# ------------------------------------------------------------------ Chromium


def _chromium(url: str, args: list[str], window: tuple[int, int], budget_ms: int) -> str:
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install -y chromium)")
    host = urlsplit(url).hostname or ""
    resolve = [] if host in LOOPBACK else [f"--host-resolver-rules=MAP {host} 127.0.0.1"]
    with tempfile.TemporaryDirectory() as profile:
        # --no-sandbox: as root (CI, containers) Chromium does not start with its sandbox
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", "--mute-audio", "--no-proxy-server",
               f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
               f"--virtual-time-budget={budget_ms}", *resolve, *args, url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_ms / 1000 + 120)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def rendered_dom(url: str, budget_ms: int = BUDGET_MS, window: tuple[int, int] = WINDOW,
                 wait_for: str | None = None, tries: int = 3) -> str:
    """The page's DOM as HTML after `budget_ms` of virtual time. With `wait_for`, loads the
    page again with twice the budget until that text is visible (at most `tries` loads) and
    returns the last DOM either way."""
    for i in range(tries if wait_for else 1):
        dom = _chromium(url, ["--dump-dom"], window, budget_ms * 2**i)
        if wait_for is None or wait_for in dom_text(dom):
            break
    return dom


def rendered_text(url: str, budget_ms: int = BUDGET_MS, window: tuple[int, int] = WINDOW,
                  wait_for: str | None = None, tries: int = 3) -> str:
    """The page's visible text (text nodes outside script/style, one a line); `wait_for`
    and `tries` as in `rendered_dom`."""
    return dom_text(rendered_dom(url, budget_ms, window, wait_for, tries))


def screenshot(url: str, png_path: str | Path, budget_ms: int = BUDGET_MS,
               window: tuple[int, int] = WINDOW) -> Path:
    """A PNG of the page's window after `budget_ms` of virtual time."""
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium(url, [f"--screenshot={png}"], window, budget_ms)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    return png


# ------------------------------------------------------------------ layout (DevTools protocol)

#: Script for `evaluate_js`: the visible table's header cells, in document order, each with
#: its text and where it lies ({"text", "left", "right", "top", "bottom"}, CSS pixels, in
#: the viewport). MLflow's artifact table view (3.17) is a plain <table> or a role="table"
#: grid; whichever has the most header cells wins.
HEADER_CELLS_JS = """
(() => {
  const sets = [...document.querySelectorAll('table, [role="table"], [role="grid"]')].map(t =>
    [...t.querySelectorAll('th, [role="columnheader"]')]);
  const cells = sets.sort((a, b) => b.length - a.length)[0] || [];
  return cells.map(c => { const r = c.getBoundingClientRect();
    return {text: c.innerText.trim(), left: r.left, right: r.right, top: r.top, bottom: r.bottom}; });
})()
"""


def evaluate_js(url: str, expression: str, *, window: tuple[int, int] = WINDOW, wait_for: str | None = None,
                wait_s: float = 90.0) -> object:
    """Load `url` in headless Chromium (a fresh profile, the given window) and return the
    value of the JavaScript `expression` once `wait_for` is in the page's text and the
    expression's value is not empty (or `wait_s` has passed), through the DevTools protocol on a 127.0.0.1 port (aiohttp's websocket
    client, a dependency of Ray's dashboard). Chromium is stopped, its process group by
    pid, on the way out. The layout is the real one: what a person sees in that window."""
    return asyncio.run(_evaluate_js(url, expression, window, wait_for, wait_s))


async def _evaluate_js(url, expression, window, wait_for, wait_s):
    import json as _json

    import aiohttp

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed (Debian: apt-get install -y chromium)")
    host = urlsplit(url).hostname or ""
    resolve = [] if host in LOOPBACK else [f"--host-resolver-rules=MAP {host} 127.0.0.1"]
    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", "--mute-audio", "--no-proxy-server", f"--user-data-dir={profile}",
             f"--window-size={window[0]},{window[1]}", "--remote-debugging-address=127.0.0.1",
             f"--remote-debugging-port={port}", *resolve, "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + wait_s
            async with aiohttp.ClientSession(trust_env=False) as session:
                while True:  # the DevTools endpoint comes up with the browser
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                            pages = [t for t in await r.json() if t["type"] == "page"]
                        if pages:
                            break
                    except aiohttp.ClientError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"chromium's DevTools endpoint did not come up (exit {proc.poll()})")
                    await asyncio.sleep(0.5)
                async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = iter(range(1, 1_000_000))

                    async def call(method, **params):
                        i = next(ids)
                        await ws.send_str(_json.dumps({"id": i, "method": method, "params": params}))
                        while True:
                            msg = _json.loads((await ws.receive()).data)
                            if msg.get("id") == i:
                                if "error" in msg:
                                    raise RuntimeError(f"{method}: {msg['error']}")
                                return msg["result"]

                    async def value(expr):
                        out = await call("Runtime.evaluate", expression=expr, returnByValue=True)
                        if "exceptionDetails" in out:
                            raise RuntimeError(f"the page's script failed: {out['exceptionDetails']}")
                        return out["result"].get("value")

                    await call("Page.navigate", url=url)
                    while wait_for is not None and not await value(
                            f"!!document.body && document.body.innerText.includes({_json.dumps(wait_for)})"):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{wait_for!r} did not appear on {url} within {wait_s:.0f} s")
                        await asyncio.sleep(0.5)
                    while not await value(expression) and time.monotonic() < deadline:
                        await asyncio.sleep(0.5)  # rendered after the text (a table after its title)
                    await asyncio.sleep(1.0)  # the layout settles (column widths)
                    return await value(expression)
        finally:
            _stop(proc)


# ------------------------------------------------------------------ reading a dump

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Dom(html.parser.HTMLParser):
    """Text nodes, and the text of ag-grid cells by (row-id, col-id)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self.cells: dict[str, dict[str, list[str]]] = {}
        self._stack: list[tuple[str, str | None, str | None, bool]] = []  # tag, row, col, hidden

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            return
        a = dict(attrs)
        row, col, hidden = (self._stack[-1][1:] if self._stack else (None, None, False))
        self._stack.append((tag, a.get("row-id", row), a.get("col-id", col),
                            hidden or tag in ("script", "style", "noscript", "title")))

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data):
        text = data.strip()
        if not text or (self._stack and self._stack[-1][3]):
            return
        self.texts.append(text)
        _, row, col, _ = self._stack[-1] if self._stack else (None, None, None, False)
        if row and col:
            self.cells.setdefault(row, {}).setdefault(col, []).append(text)


def dom_text(dom: str) -> str:
    """The visible text of a dumped DOM, one text node a line."""
    p = _Dom()
    p.feed(dom)
    return "\n".join(p.texts)


def grid_cells(dom: str) -> dict[str, dict[str, str]]:
    """The ag-grid cells of a dumped DOM: {row-id: {col-id: text}}. In MLflow's runs table
    the row id is the run id and the columns are e.g. "attributes.`Run Name`",
    "attributes.`Dataset`", "attributes.`Models`"."""
    p = _Dom()
    p.feed(dom)
    return {row: {col: " ".join(t) for col, t in cols.items()} for row, cols in p.cells.items()}


def js_text(value) -> str:
    """A JSON value as the UI prints it (JavaScript's String()): 21.0 -> "21", None -> "null".
    Give it the value as read from the JSON file the UI reads (`mlflow.log_table` writes
    floats to 10 significant digits)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def title(dom: str) -> str:
    """The page's <title> (MLflow: "Runs - Experiment 1 - MLflow", "Overview - ...")."""
    start = dom.find("<title>")
    end = dom.find("</title>", start)
    return html.unescape(dom[start + 7:end]) if start >= 0 and end > start else ""
