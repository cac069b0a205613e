"""`base-transfer`: a LoRA trained with the `sft` objective on the multi-step base model, then applied to the turbo
(common practice: train on the base, use on the distilled model).

The base is loaded in `setup` (`config.base_model`, same architecture as the turbo); the shared loop's steps train
its LoRA. `finish()` (or the first `sample`) saves that LoRA in the diffusers format and loads it onto the turbo
through save_lora / load_lora, the same files a user would move between the two models.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from dopsd_bench import backbones
from dopsd_bench.backbones.base import Backbone
from dopsd_bench.method import Batch
from dopsd_bench.registry import METHODS

from .sft import SFT, SFTConfig, flow_matching_objective


@dataclass
class BaseTransferConfig(SFTConfig):
    base_model: str = "glyphworld-base"  # the multi-step model the LoRA is trained on (name, path or hub id)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base_model:
            raise ValueError("base_model must name the multi-step base model (e.g. glyphworld-base)")


@METHODS.register("base-transfer", description="SFT LoRA trained on the multi-step base, applied to the turbo")
class BaseTransfer(SFT):
    name = "base-transfer"
    description = "SFT LoRA trained on the multi-step base, applied to the turbo"
    Config = BaseTransferConfig
    continual = False  # its LoRA trains on another model, loaded anew every setup

    def setup(self, backbone: Backbone, train: Batch, rank: int, generator: torch.Generator) -> None:
        self.backbone = backbone  # the turbo: sampled and saved after the transfer
        self.base = backbones.load_backbone(backbone.name, self.config.base_model, backbone.device)
        self.base.add_lora(self.adapter, rank=rank)
        self.transferred = False

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.base.lora_parameters(self.adapter)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        self.base.set_adapter(self.adapter)
        x0 = self.base.encode_images(batch.images)
        cond = self.base.encode_prompts(batch.captions)
        return flow_matching_objective(self.base, x0, cond, self.config, generator)

    def finish(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.base.save_lora(tmp, self.adapter)
            self.backbone.load_lora(tmp, self.adapter)
        self.transferred = True

    def sample(self, prompts: list[str], seeds: list[int], steps: int | None = None,
               references: torch.Tensor | None = None) -> torch.Tensor:
        if not self.transferred:
            self.finish()
        return super().sample(prompts, seeds, steps, references)
