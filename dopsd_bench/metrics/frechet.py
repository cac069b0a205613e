"""Fréchet distance and KID between feature sets, through torchmetrics with a custom feature module.

torchmetrics' FrechetInceptionDistance / KernelInceptionDistance accept any nn.Module as `feature=` (1.9: it
reads `num_features` or runs a dummy image). Scoring embeds each image set once, so here the module is the
identity on precomputed features (`FeaturesIn`); `fd_metric(extractor)` builds the same metric over images with
the extractor's embedding (`FeatureModule`) for users who stream images through `update`.

    fd = frechet_distance(real_feats, fake_feats)   # float; 0 for a set against itself
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from dopsd_bench.errors import require_finite
from dopsd_bench.metrics.features import FeatureExtractor, FeatureModule


class FeaturesIn(nn.Module):
    """Identity feature module: `update` receives features (N, D), not images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features of shape (N, {self.num_features}), got {tuple(features.shape)}")
        return features.double()


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets with the same D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"Fréchet distance needs at least 2 samples per set, got {real.shape[0]} and {fake.shape[0]}")
    # NaN features crash the matrix square root in native code (a segfault, not an exception): refuse them here
    require_finite(real, "the reference features")
    require_finite(fake, "the sample features", "the images they come from are not finite")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) of two feature sets, in float64."""
    _check_pair(real, fake)
    metric = FrechetInceptionDistance(feature=FeaturesIn(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """KID (unbiased polynomial-kernel MMD^2) and its std over subsets; unbiased at small N, unlike FD.

    With equal set sizes one subset of all samples is used (the estimate is then exact and deterministic);
    otherwise `subsets` random subsets of the smaller size, drawn from a fixed seed.
    """
    _check_pair(real, fake)
    size = min(real.shape[0], fake.shape[0])
    n_subsets = 1 if real.shape[0] == fake.shape[0] else subsets
    with warnings.catch_warnings():  # "will save all extracted features": expected, the sets are small
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=FeaturesIn(real.shape[1]), subsets=n_subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def fd_metric(extractor: FeatureExtractor, num_features: int) -> FrechetInceptionDistance:
    """torchmetrics FID over images (B, 3, H, W) in [-1, 1], with the extractor's embedding as its feature."""
    return FrechetInceptionDistance(feature=FeatureModule(extractor, num_features))
