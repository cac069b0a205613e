"""`icl`: the in-context teacher itself at inference, with no training: every prompt is sampled with a training
image as reference (cycled over prompts), through the same multimodal path that D-OPSD's teacher uses. It is the
upper reference for fidelity: what distillation could at best transfer into the text-only student.
"""

from __future__ import annotations

import torch

from dopsd_bench.backbones.base import Backbone
from dopsd_bench.method import Batch, Method, MethodConfig
from dopsd_bench.registry import METHODS


@METHODS.register("icl", description="the in-context teacher at inference (training images as references)")
class ICL(Method):
    name = "icl"
    description = "the in-context teacher at inference (training images as references)"
    Config = MethodConfig
    trains = False
    adapter = None
    continual = False  # nothing carries between rounds: it samples with the current round's references

    def setup(self, backbone: Backbone, train: Batch, rank: int, generator: torch.Generator) -> None:
        if train.images.shape[0] == 0:
            raise ValueError("icl needs at least one training image to use as reference")
        self.backbone = backbone
        self.references = train.images

    def sample(self, prompts: list[str], seeds: list[int], steps: int | None = None,
               references: torch.Tensor | None = None) -> torch.Tensor:
        if references is None:
            index = torch.arange(len(prompts)) % self.references.shape[0]
            references = self.references[index]
        self.backbone.set_adapter(None)
        return self.backbone.sample(prompts, seeds, steps, references=references)
