"""Serve the dashboard on loopback and look at it with headless Chromium, driven over the Chrome DevTools
Protocol with the `websockets` package: no browser download, no driver. Shared by the browser test and
`dashboard/screenshot.py`. Each helper stops exactly the processes it started, by their handles."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "app.py"
CHROMIUM = os.environ.get("RMOE_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium waits on the (closed) network before it serves CDP.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)
# The page is drawn when the script has finished and every Altair chart (canvas or svg) and Graphviz graph (svg) is.
PAGE_STATE_JS = """(() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app) return {state: "loading"};
  const vega = document.querySelectorAll('[data-testid="stVegaLiteChart"]').length;
  const graphs = document.querySelectorAll('[data-testid="stGraphVizChart"]').length;
  const drawnVega = document.querySelectorAll(
    '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg.marks').length;
  const drawnGraphs = document.querySelectorAll('[data-testid="stGraphVizChart"] svg').length;
  // a failed run's recorded error (shown in a code block) may hold a traceback; the app's own may not
  const main = (document.querySelector('[data-testid="stMain"]') || document.body).cloneNode(true);
  main.querySelectorAll('[data-testid="stCode"]').forEach((node) => node.remove());
  const outsideCode = main.innerText || main.textContent || "";
  return {
    state: app.getAttribute("data-test-script-state"),
    connection: app.getAttribute("data-test-connection-state"),
    title: (document.querySelector('[data-testid="stMain"] h1') || {}).textContent || null,
    vega: vega,
    charts: vega + graphs,
    drawn: drawnVega + drawnGraphs,
    exceptions: document.querySelectorAll('[data-testid="stException"]').length,
    traceback: outsideCode.includes("Traceback"),
    text: document.body.innerText.slice(0, 4000),
  };
})()"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a process we started (and, when it led its own session, what it spawned in that group)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created for it: leftover helpers only


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def serve(results: str, *, log: Path | None = None, timeout: float = 60.0) -> Iterator[Server]:
    """`streamlit run dashboard/app.py` on a free loopback port, yielded once healthy."""
    port = free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",
        "--", "--results", results,
    ]  # fmt: skip
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, timeout)
        yield Server(url, proc.pid)
    finally:
        _stop(proc)
        if log:
            out.close()  # type: ignore[union-attr]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode} before serving {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer {url}/_stcore/health within {timeout:.0f} s")


@dataclass
class PageState:
    url: str
    title: str | None
    charts: int
    drawn: int
    exceptions: int
    traceback: bool
    text: str


class Browser:
    """One headless Chromium tab, commanded over CDP."""

    def __init__(self, ws: ClientConnection, pid: int) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.pid = pid  # of the Chromium browser process

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:  # events (no id) are skipped
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, *, want_chart: bool = False, timeout: float = 45.0) -> PageState:
        """Navigate and wait until Streamlit has finished the script and drawn every chart (at least one
        when `want_chart`), then a moment more for late layout."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        settled = 0
        while time.monotonic() < deadline:
            time.sleep(0.4)
            state = self.evaluate(PAGE_STATE_JS) or {}
            ready = (
                state.get("state") == "notRunning"
                and state.get("connection") == "CONNECTED"
                and (state.get("title") or state.get("exceptions"))
                and state.get("drawn", 0) >= state.get("charts", 0)
                and (state.get("vega", 0) > 0 or not want_chart)
            )
            settled = settled + 1 if ready else 0
            if settled >= 3:  # unchanged over ~1 s: the script is not about to rerun
                break
        else:
            raise TimeoutError(f"{url} did not finish rendering in {timeout:.0f} s: {state}")
        return PageState(
            url,
            state.get("title"),
            state.get("charts", 0),
            state.get("drawn", 0),
            state.get("exceptions", 0),
            bool(state.get("traceback")),
            state.get("text", ""),
        )

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def chromium(*, width: int = 1440, height: int = 1000, timeout: float = 30.0) -> Iterator[Browser]:
    """Headless Chromium with a fresh profile in a temp folder, stopped (and the folder removed) on exit."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="rmoe-chromium-"))
    command = [
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port = _devtools_port(profile, proc, timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
            targets = json.loads(response.read())
        page = next(t for t in targets if t.get("type") == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as ws:
            browser = Browser(ws, proc.pid)
            browser.call("Page.enable")
            browser.call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            yield browser
            with contextlib.suppress(Exception):
                browser.call("Browser.close", timeout=5)
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    """Chromium writes the port it picked (for --remote-debugging-port=0) into the profile folder."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before opening its DevTools port")
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium opened no DevTools port within {timeout:.0f} s")


PAGES = {"overview": "", "pipelines": "pipelines", "sweeps": "sweeps", "run_detail": "run_detail", "experts": "experts"}


def page_url(base: str, page: str) -> str:
    return f"{base}/{PAGES[page]}"
