"""The dashboard served on loopback and opened in headless Chromium (Debian's, driven over the DevTools
protocol): every page loads without an exception, the overview chart is drawn, screenshots are kept."""

from __future__ import annotations

import os
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


@pytest.mark.slow
def test_every_page_in_headless_chromium(tmp_path: Path, repo_root: Path) -> None:
    if not Path(browser.CHROMIUM).exists():
        pytest.fail(f"{browser.CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    store = write_full_store(tmp_path)
    artifacts = repo_root / "test-artifacts" / "dashboard"
    with browser.serve(str(store), log=tmp_path / "streamlit.log") as server, browser.chromium() as tab:
        pids = (server.pid, tab.pid)
        for page, title in TITLES.items():
            state = tab.open(browser.page_url(server.url, page), want_chart=page == "overview")
            shot = tab.screenshot(artifacts / f"{page}.png")
            assert state.exceptions == 0 and not state.traceback, f"{page}:\n{state.text}"
            assert state.title == title, f"{page}:\n{state.text}"
            assert shot.stat().st_size > 10_000, "a screenshot of a drawn page"
            if page == "overview":
                assert state.drawn >= 1, "the overview chart rendered (vega-embed canvas/svg)"
    assert not any(_alive(pid) for pid in pids), "the test stops the processes it started"
