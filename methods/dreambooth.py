"""`dreambooth`: SFT plus prior preservation (Ruiz et al. 2023, as diffusers' train_dreambooth_lora_flux2.py does it).

Class images are sampled once in `setup` from the untuned model (adapters disabled) at its native steps, on prompts
derived from the training captions: the task's token replaced by `class_word` (or, if that is empty, removed).
Each step trains on the instance batch and as many class images in one forward, loss = instance + weight * prior.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from dopsd_bench.backbones.base import Backbone, cat_conds
from dopsd_bench.losses import prior_preservation_loss
from dopsd_bench.method import Batch
from dopsd_bench.registry import METHODS

from .sft import SFT, SFTConfig, flow_matching_objective


@dataclass
class DreamBoothConfig(SFTConfig):
    class_word: str = ""  # replaces the token in the class prompts; "" removes the token instead
    prior_loss_weight: float = 1.0  # diffusers' --prior_loss_weight default
    num_class_images: int = 16  # sampled once, cycling over the derived class prompts

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.num_class_images < 1:
            raise ValueError(f"num_class_images must be >= 1, got {self.num_class_images}")


def class_prompts(captions: list[str], token: str, class_word: str) -> list[str]:
    """The captions with `token` (as a whole word) replaced by `class_word`, or removed if it is empty."""
    if not token:
        return list(captions)
    pattern = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)")
    return [" ".join(pattern.sub(class_word, c).split()) for c in captions]


@METHODS.register("dreambooth", description="SFT + prior preservation on class images from the untuned model")
class DreamBooth(SFT):
    name = "dreambooth"
    description = "SFT + prior preservation on class images from the untuned model"
    Config = DreamBoothConfig

    def graph_rows(self, batch_size: int, native_steps: int) -> int:
        return 2 * batch_size  # the instance batch and as many class images in one forward

    def setup(self, backbone: Backbone, train: Batch, rank: int, generator: torch.Generator) -> None:
        if not train.token:
            warnings.warn("dreambooth got no task token (Batch.token is empty): class prompts are the training "
                          "captions unchanged", stacklevel=2)
        prompts = class_prompts(train.captions, train.token, self.config.class_word)
        n = self.config.num_class_images
        self.class_captions = [prompts[i % len(prompts)] for i in range(n)]
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()
        backbone.set_adapter(None)  # the untuned model
        with torch.no_grad():
            latents = backbone.sample_latents(backbone.encode_prompts(self.class_captions), seeds)
        # decode and re-encode, so class images reach training exactly as instance images do (through pixels)
        self.class_images = backbone.decode_latents(latents).clamp(-1, 1)
        self.class_latents = backbone.encode_images(self.class_images)
        super().setup(backbone, train, rank, generator)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        bb = self.backbone
        bb.set_adapter(self.adapter)
        b = batch.images.shape[0]
        index = torch.randint(0, self.class_latents.shape[0], (b,), generator=generator)
        x0 = torch.cat([bb.encode_images(batch.images), self.class_latents[index]])
        class_captions = [self.class_captions[i] for i in index]
        cond = cat_conds([bb.encode_prompts(batch.captions), bb.encode_prompts(class_captions)])
        # one forward on instance + class images, split afterwards (as diffusers' script chunks model_pred)
        per_sample = flow_matching_objective(bb, x0, cond, self.config, generator, per_sample=True)
        return prior_preservation_loss(per_sample[:b].mean(), per_sample[b:].mean(), self.config.prior_loss_weight)
