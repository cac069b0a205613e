"""Where the embedded models live: dopsd_bench/assets, or $DOPSD_BENCH_ASSETS (e.g. a fresh build elsewhere)."""

import os
from pathlib import Path

PACKAGE_ASSETS = Path(__file__).resolve().parent / "assets"


def assets_dir() -> Path:
    return Path(os.environ.get("DOPSD_BENCH_ASSETS", PACKAGE_ASSETS))
