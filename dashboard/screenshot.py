"""Save a screenshot of a dashboard page, served on a results store (the README's docs/overview.png):

python dashboard/screenshot.py --results runs/results --out docs/overview.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboard import browser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="runs/results", help="results store: local path or s3://…")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "overview.png")
    parser.add_argument("--page", default="overview", choices=sorted(browser.PAGES))
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    with (
        browser.serve(args.results) as server,
        browser.chromium(width=args.width, height=args.height) as tab,
    ):
        state = tab.open(browser.page_url(server.url, args.page), want_chart=args.page == "overview")
        if state.broken:
            print(f"the page shows an error:\n{state.text}", file=sys.stderr)
            return 1
        tab.screenshot(args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
