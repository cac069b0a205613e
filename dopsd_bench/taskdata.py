"""What a task hands to training and scoring: images, captions, prompts, seeds and (for the world) true attributes.

Built by dopsd_bench/tasks.py from a YAML spec (embedded world or a user image folder). A task never touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskData:
    task: str  # task name, e.g. "style"
    family: str  # "concept" | "style"
    instance: str  # e.g. "zorb" or "dotted"
    token: str  # the new token that names the concept/style in prompts
    train_images: torch.Tensor  # (N, 3, H, W) in [-1, 1]; also the references for fidelity
    train_captions: list[str]
    eval_prompts: list[str]  # prompts that use the token in new contexts
    eval_seeds: list[int]  # one fixed seed per sample; shared by every method
    retention_prompts: list[str]  # general prompts that never mention the token
    retention_seeds: list[int]
    # embedded world only (None for user folders): true attributes per prompt, and true renders for FD
    eval_targets: list[dict[str, str]] | None = None
    retention_targets: list[dict[str, str]] | None = None
    retention_real: torch.Tensor | None = None  # (M, 3, H, W) true renders of the retention prompts

    @property
    def source(self) -> str:
        return "world" if self.eval_targets is not None else "folder"
