"""The dashboard served on loopback and opened in headless Chromium (Debian's, driven by Playwright): every
page loads without an exception or an error box, the overview chart is drawn, screenshots are kept under
test-artifacts/dashboard/ (where CI leaves them), and a planted error is caught."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from dashboard_store import write_full_store

from dashboard import browser

TITLES = {
    "overview": "Accuracy versus training cost",
    "pipelines": "Cost by stage",
    "sweeps": "Sweeps",
    "run_detail": "Run detail",
    "experts": "Experts",
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _require_chromium() -> None:
    if not Path(browser.CHROMIUM).exists():
        pytest.fail(f"{browser.CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")


@pytest.mark.slow
def test_every_page_in_headless_chromium(tmp_path: Path, repo_root: Path) -> None:
    _require_chromium()
    store = write_full_store(tmp_path)
    artifacts = repo_root / "test-artifacts" / "dashboard"
    with browser.serve(str(store), log=tmp_path / "streamlit.log") as server, browser.chromium() as tab:
        server_pid, profile = server.pid, tab.profile
        for page, title in TITLES.items():
            state = tab.open(browser.page_url(server.url, page), want_chart=page == "overview")
            shot = tab.screenshot(artifacts / f"{page}.png")
            assert not state.broken, f"{page}:\n{state.text}"
            assert state.title == title, f"{page}:\n{state.text}"
            assert shot.stat().st_size > 10_000, "a screenshot of a drawn page"
            if page == "overview":
                assert state.drawn >= 1, "the overview chart rendered (vega-embed canvas/svg)"
    assert not _alive(server_pid) and not browser.chromium_running(profile), "the test stops what it started"


@pytest.mark.slow
def test_an_error_box_on_a_page_is_caught(tmp_path: Path, repo_root: Path) -> None:
    """A store that cannot be read makes the app say so in an st.error box: the browser check sees it."""
    _require_chromium()
    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file where the results store should be")
    with browser.serve(str(not_a_folder), log=tmp_path / "streamlit.log") as server, browser.chromium() as tab:
        state = tab.open(browser.page_url(server.url, "overview"))
        tab.screenshot(repo_root / "test-artifacts" / "dashboard" / "planted-error.png")
    assert state.errors == 1 and state.broken, state.text
    assert "Cannot read the results store" in state.text


def test_the_server_starts_again_on_another_port_when_its_port_was_taken(tmp_path: Path, monkeypatch) -> None:
    """A port picked free can be bound by someone else before Streamlit binds it: the server exits, and the
    helper starts it again on a fresh port; the server's log is kept where the caller asked."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, browser.free_port()])
        monkeypatch.setattr(browser, "free_port", lambda: next(ports))
        log = tmp_path / "streamlit.log"
        with browser.serve(str(tmp_path / "results"), log=log) as server:
            assert not server.url.endswith(f":{taken}")
            pid = server.pid
        assert not _alive(pid)
    assert f"Port {taken} is not available" in log.read_text(), "the failed start is in the kept log"


def test_a_server_that_cannot_start_says_why_from_its_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(browser, "APP", tmp_path / "no_such_app.py")
    refused = pytest.raises(RuntimeError, match=r"(?s)before serving .*its log ends:.*no_such_app\.py")
    with refused, browser.serve(str(tmp_path / "results"), timeout=30):
        pass
