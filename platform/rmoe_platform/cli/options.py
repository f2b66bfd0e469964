"""Command-line options the jobs share."""

from __future__ import annotations

import argparse

from rmoe_platform.config.fields import ConfigError

SEEDS_HELP = (
    "comma-separated seeds, e.g. 0,1,2: every run once per seed, compared with 95%% confidence intervals and "
    "paired differences (overrides the config's seed/seeds)"
)


def add_seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", help=SEEDS_HELP)


def seeds_override(text: str, field: str) -> str:
    """`--seeds 0,1,2` as the override `{field}=[0, 1, 2]` (a ConfigError naming the flag otherwise)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ConfigError(f"--seeds: expected comma-separated integers >= 0 (e.g. 0,1,2), got {text!r}")
    return f"{field}=[{', '.join(parts)}]"
