"""Backbone adapters: one class per architecture over its diffusers pipeline, registered by name in BACKBONES.

    backbone = load_backbone("flux2-klein")                  # the embedded default model
    backbone = load_backbone("flux2-klein", "path/or/hub-id", device="cuda")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dopsd_bench.registry import BACKBONES

if TYPE_CHECKING:
    from dopsd_bench.backbones.base import Backbone

__all__ = ["BACKBONES", "backbone_identity", "load_backbone"]


def load_backbone(name: str, model: str | None = None, device: str | None = None, **options) -> Backbone:
    """The registered backbone `name` loaded from `model` (a local path or hub id; None = its default model).

    `options` go to the adapter's from_pretrained (e.g. z-image's `vl_model`, the teacher's path or hub id)."""
    cls = BACKBONES.get(name)
    if not verbose():  # diffusers' and transformers' loading bars, printed on every run, say nothing to a user
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    return cls.from_pretrained(model or cls.default_model, device=device, **options)


def verbose() -> bool:
    """Whether the user asked for dependencies' own output (`--verbose` or DOPSD_BENCH_VERBOSE=1)."""
    import os

    return os.environ.get("DOPSD_BENCH_VERBOSE", "") not in ("", "0")


def backbone_identity(name: str, model: str | None = None) -> str:
    """The model id a run of backbone `name` on `model` records (see Backbone.identity); loads no weights."""
    return BACKBONES.get(name).identity(model)
