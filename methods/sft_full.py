"""`sft-full`: the `sft` objective as a full fine-tune of the denoiser (every parameter trains, no LoRA).

Its default lr is lower than the LoRA methods' (a full fine-tune on a few images collapses quickly, see DESIGN.md).
There is no adapter to save: the tuned weights are the denoiser itself.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dopsd_bench.backbones.base import Backbone
from dopsd_bench.method import Batch
from dopsd_bench.registry import METHODS

from .sft import SFT


@METHODS.register("sft-full", description="the sft objective as a full fine-tune of the denoiser (lower lr)")
class SFTFull(SFT):
    name = "sft-full"
    description = "the sft objective as a full fine-tune of the denoiser (lower lr)"
    adapter: ClassVar[str | None] = None
    default_lr: ClassVar[float | None] = 1e-5
    continual: ClassVar[bool] = False  # its state is the whole denoiser, not a carried adapter

    def setup(self, backbone: Backbone, train: Batch, rank: int, generator: torch.Generator) -> None:
        self.backbone = backbone
        backbone.set_adapter(None)
        backbone.denoiser.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.backbone.denoiser.named_parameters() if "lora_" not in n]
