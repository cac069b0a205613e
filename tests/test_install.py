"""A non-editable install ships the methods/ and tasks/ folders: build the wheel, check its contents, install it
into a private folder and use it from there (the checkout not on the path)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2] if x.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return (0,)


def source_files(folder: str, pattern: str) -> list[str]:
    return sorted(p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob(pattern)
                  if "__pycache__" not in p.parts)


@pytest.mark.slow
def test_wheel_holds_methods_tasks_and_assets(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("dopsd_bench", "methods", "tasks"):
        shutil.copytree(ROOT / name, src / name, ignore=IGNORE)
    # the installed setuptools when it is recent enough (fast, offline); else pip's isolated build env
    isolation = ["--no-build-isolation"] if _setuptools_version() >= (64,) else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation, "-q",
                    "-w", str(tmp_path / "dist")], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("dopsd_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    methods = source_files("methods", "*.py")
    assert "__init__.py" in methods and len(methods) > 1
    assert {f"dopsd_bench/methods/{m}" for m in methods} <= names
    assert {"dopsd_bench/tasks_data/concept.yaml", "dopsd_bench/tasks_data/style.yaml"} <= names
    assert {f"dopsd_bench/{p}" for p in source_files("dopsd_bench", "*.py")} <= names  # every core module
    assets = [p for p in source_files("dopsd_bench", "*") if p.startswith("assets/") and (ROOT / "dopsd_bench" / p)
              .is_file()]
    assert {f"dopsd_bench/{p}" for p in assets} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "dopsd-bench = dopsd_bench.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    probe = (
        "import dopsd_bench, dopsd_bench.methods as m, dopsd_bench.tasks_data as t\n"
        "from dopsd_bench.registry import TASKS\n"
        "from dopsd_bench.tasks import builtin_tasks_dir, load_task\n"
        "print(dopsd_bench.__file__); print(list(m.__path__)[0]); print(builtin_tasks_dir())\n"
        "print(','.join(TASKS.names())); print(load_task('concept').default_instance)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()
    assert all(line.startswith(str(site)) for line in out[:3]), out
    assert {"concept", "style"} <= set(out[3].split(",")) and out[4] == "zorb"
