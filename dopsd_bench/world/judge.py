"""The world judge: a small CNN that reads a 32x32 image's true attributes and gives an embedding.

It is the embedded world's DINO/CLIP: attribute probabilities measure prompt alignment and concept/style fidelity,
its embedding gives Fréchet distances and similarities. Trained by scripts/build_world.py on fresh renders; never
used as a training signal by any method.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dopsd_bench.paths import assets_dir
from dopsd_bench.world.render import ATTRIBUTES


class WorldJudge(nn.Module):
    def __init__(self, width: int = 48, embed_dim: int = 128):
        super().__init__()
        self.config = {"width": width, "embed_dim": embed_dim}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.features = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                      block(2 * w, 4 * w), nn.MaxPool2d(2))  # -> (4w, 4, 4): keeps position
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, embed_dim), nn.LayerNorm(embed_dim))
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [-1, 1] -> (B, embed_dim) features."""
        return self.embedding(self.features(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] -> logits per attribute (over render.ATTRIBUTES[attr])."""
        return self.embed_and_logits(images)[1]

    def embed_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Both views from one pass of the trunk (scoring needs both for every image set)."""
        e = self.embed(images)
        r = torch.relu(e)
        return e, {k: head(r) for k, head in self.heads.items()}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "judge.safetensors")
        (path / "config.json").write_text(json.dumps({**self.config, "attributes": ATTRIBUTES}, indent=1))

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> WorldJudge:
        path = Path(path) if path is not None else assets_dir() / "judge"
        if not (path / "judge.safetensors").exists():
            from dopsd_bench.errors import UserError

            raise UserError(f"world judge not found at {path}: build it with `python scripts/build_world.py`")
        config = json.loads((path / "config.json").read_text())
        if config.get("attributes") != ATTRIBUTES:
            raise ValueError(f"judge at {path} was trained on other attribute labels; rebuild it")
        judge = cls(config["width"], config["embed_dim"])
        judge.load_state_dict(load_file(path / "judge.safetensors"))
        return judge.to(device).eval().requires_grad_(False)
