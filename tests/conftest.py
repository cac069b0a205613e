"""Shared test setup: offline by default, and a fixture that undoes registry changes a test makes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture
def restore_registries():
    """Snapshot METHODS/TASKS/BACKBONES/METRICS and put them back after the test (entries, load state, paths)."""
    from dopsd_bench.registry import BACKBONES, METHODS, METRICS, TASKS

    registries = (METHODS, TASKS, BACKBONES, METRICS)
    saved = [(dict(r._entries), r._loaded, list(r.extra_paths)) for r in registries]
    yield registries
    for r, (entries, loaded, paths) in zip(registries, saved, strict=True):
        r._entries, r._loaded, r.extra_paths = entries, loaded, paths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than with intra-op threads fighting over 2 shared cores;
    a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
