"""Serve the dashboard on loopback and look at it with headless Chromium (Debian's, driven by Playwright
with no browser download). Shared by the browser test and `dashboard/screenshot.py`. Each helper stops
exactly the processes it started: the Streamlit server by its handle, Chromium through Playwright."""

from __future__ import annotations

import contextlib
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

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "app.py"
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium waits on the (closed) network before it serves pages.
CHROMIUM_FLAGS = (
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
# The page is drawn when the script has finished and every Altair chart (canvas or svg) and Graphviz graph
# (svg) is. `errors` counts st.error boxes, `exceptions` st.exception ones: a page that caught its own
# failure and said so with st.error is as broken as one that raised.
PAGE_STATE_JS = """() => {
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
    errors: document.querySelectorAll('[data-testid="stAlertContentError"]').length,
    traceback: outsideCode.includes("Traceback"),
    text: document.body.innerText.slice(0, 4000),
  };
}"""


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
    log: Path  # the server's output, kept: its tail says why a server died

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)


START_ATTEMPTS = 3  # a port picked free may be bound by someone else before Streamlit binds it


@contextlib.contextmanager
def serve(results: str, *, log: Path | None = None, timeout: float = 60.0) -> Iterator[Server]:
    """`streamlit run dashboard/app.py` on a free loopback port, yielded once healthy. Its output goes to
    `log` (a temporary file when not given, removed after a clean stop); a server that exits before it
    serves, or while in use, raises or reports with the log's tail."""
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamlit-"))) / "streamlit.log"
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    _command(port, results), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_healthy(url, proc, timeout, log)
            except _PortTakenError:
                _stop(proc)
                if attempt == START_ATTEMPTS:
                    raise RuntimeError(f"streamlit: every port it was given was taken ({attempt} tries)") from None
                continue
            except BaseException:
                _stop(proc)
                raise
            break
        server = Server(url, proc.pid, log)
        try:
            yield server
        except BaseException:
            if proc.poll() is not None:
                print(f"streamlit exited ({proc.returncode}) while in use; its log ends:\n{server.log_tail()}",
                      file=sys.stderr)  # fmt: skip
            raise
        finally:
            _stop(proc)


def _command(port: int, results: str) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",
        "--", "--results", results,
    ]  # fmt: skip


class _PortTakenError(Exception):
    pass


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log)
            if "is not available" in tail or "already in use" in tail:
                raise _PortTakenError(url)
            raise RuntimeError(f"streamlit exited with {proc.returncode} before serving {url}; its log ends:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(
        f"streamlit did not answer {url}/_stcore/health within {timeout:.0f} s; its log ends:\n{_tail(log)}"
    )


def _tail(log: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@dataclass
class PageState:
    url: str
    title: str | None
    charts: int
    drawn: int
    exceptions: int  # st.exception boxes
    errors: int  # st.error boxes
    traceback: bool
    text: str

    @property
    def broken(self) -> bool:
        """Whether the page shows a failure of its own: an exception, an error box or a traceback."""
        return bool(self.exceptions or self.errors or self.traceback)


class Browser:
    """One headless Chromium tab (a Playwright page)."""

    def __init__(self, page: Page, profile: Path) -> None:
        self.page = page
        self.profile = profile  # Chromium's --user-data-dir: how its processes are recognised

    def open(self, url: str, *, want_chart: bool = False, timeout: float = 45.0) -> PageState:
        """Navigate and wait until Streamlit has finished the script and drawn every chart (at least one
        when `want_chart`), unchanged over ~1 s (the script is not about to rerun)."""
        self.page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        settled = 0
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(400)
            state = self.page.evaluate(PAGE_STATE_JS) or {}
            ready = (
                state.get("state") == "notRunning"
                and state.get("connection") == "CONNECTED"
                and (state.get("title") or state.get("exceptions") or state.get("errors"))
                and state.get("drawn", 0) >= state.get("charts", 0)
                and (state.get("vega", 0) > 0 or not want_chart)
            )
            settled = settled + 1 if ready else 0
            if settled >= 3:
                break
        else:
            raise TimeoutError(f"{url} did not finish rendering in {timeout:.0f} s: {state}")
        return PageState(
            url,
            state.get("title"),
            state.get("charts", 0),
            state.get("drawn", 0),
            state.get("exceptions", 0),
            state.get("errors", 0),
            bool(state.get("traceback")),
            state.get("text", ""),
        )

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path


@contextlib.contextmanager
def chromium(*, width: int = 1440, height: int = 1000, timeout: float = 30.0) -> Iterator[Browser]:
    """Headless Debian Chromium with a fresh profile in a temp folder; closed (and the folder removed) on exit."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="rmoe-chromium-"))
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=CHROMIUM,
                headless=True,
                args=list(CHROMIUM_FLAGS),
                viewport={"width": width, "height": height},
                timeout=timeout * 1000,
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                yield Browser(page, profile)
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def chromium_running(profile: Path) -> bool:
    """Whether a Chromium process of this profile is still alive (read from /proc)."""
    marker = f"--user-data-dir={profile}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    return True
    return False


PAGES = {"overview": "", "pipelines": "pipelines", "sweeps": "sweeps", "run_detail": "run_detail", "experts": "experts"}


def page_url(base: str, page: str) -> str:
    return f"{base}/{PAGES[page]}"
