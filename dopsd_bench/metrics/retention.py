"""What retention is made of: leakage, attribute retention, few-step capacity and sharpness, as pure functions.

`retention_fd_ratio` (evaluate.py) mixes two failures a tuned model can have on prompts that never mention the new
concept: *leakage* (it paints the newly learned glyph/fill where nobody asked for it, at every step count) and lost
*few-step capacity* (its native-step samples got worse than its own many-step samples). These functions separate
them; each maps precomputed features, probabilities, images or Fréchet distances to numbers (see docs/metrics.md).

    leak = paired_shift(label_probability(p_tuned, label), label_probability(p_untuned, label))   # 0 for base
    gap = few_step_gap_ratio(fd_tuned_native, fd_tuned_many, fd_untuned_native, fd_untuned_many)  # 1 = kept
    sharp = relative_to_reference(laplacian_energy(tuned), laplacian_energy(untuned))              # 1 = as sharp
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dopsd_bench.metrics.scores import attribute_hits

# the 5-point discrete Laplacian: a high-pass filter whose response is 0 on any linear ramp
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def paired_shift(tuned: torch.Tensor, untuned: torch.Tensor) -> torch.Tensor:
    """Per sample, tuned minus untuned value on the same prompt and seed (0 everywhere for the untuned model)."""
    if tuned.shape != untuned.shape or tuned.ndim != 1:
        raise ValueError(f"expected two (N,) per-sample tensors of the same N (same prompts and seeds), got "
                         f"{tuple(tuned.shape)} and {tuple(untuned.shape)}")
    return tuned.double() - untuned.double()


def label_probability(probs: torch.Tensor, label: int) -> torch.Tensor:
    """(B, L) judge probabilities -> (B,) probability of one label (e.g. the task's held-out glyph or fill)."""
    if probs.ndim != 2 or not 0 <= label < probs.shape[1]:
        raise ValueError(f"expected (B, L) probabilities and a label in [0, L), got {tuple(probs.shape)} and {label}")
    return probs[:, label].double()


def label_rate(probs: torch.Tensor, label: int) -> torch.Tensor:
    """(B, L) judge probabilities -> (B,) 1.0 where the judge's argmax is `label`, else 0.0."""
    label_probability(probs, label)  # same checks
    return (probs.argmax(dim=1) == label).double()


def attribute_retention(probs: dict[str, torch.Tensor], targets: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Per attribute the retention prompts state, a (N,) 0/1 hit per sample (the judge's argmax finds it).

    All retention prompts state every attribute, so the rows line up with the samples; an attribute some prompt
    does not state is left out rather than scored on a subset that would not pair with other attributes.
    """
    n = len(targets)
    return {attr: hit.double() for attr, (rows, hit) in attribute_hits(probs, targets).items() if len(rows) == n}


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (B,) mean squared response of the discrete Laplacian over channels and interior pixels.

    High-frequency energy: 0 on a flat or linearly shaded image; 64 on a +-1 checkerboard (the highest frequency);
    a Gaussian blur lowers it. Interior pixels only, so no padding invents edges at the border.
    """
    if images.ndim != 4 or images.shape[-1] < 3 or images.shape[-2] < 3:
        raise ValueError(f"expected images of shape (B, C, H, W) with H, W >= 3, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    x = images.double().reshape(b * c, 1, h, w)
    response = F.conv2d(x, LAPLACIAN.double().view(1, 1, 3, 3))
    return response.pow(2).reshape(b, -1).mean(dim=1)


def relative_to_reference(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each value divided by the reference set's mean: the mean of the result is mean(values) / mean(reference),
    and every method on the same reference (the untuned model) shares the denominator, so values pair."""
    ref = float(reference.double().mean())
    if not ref > 0:
        raise ValueError(f"the reference set's mean must be positive to divide by, got {ref} (flat images have no "
                         "high-frequency energy to compare with)")
    return values.double() / ref


def few_step_gap_ratio(tuned_native: float, tuned_many: float, untuned_native: float, untuned_many: float) -> float:
    """How much worse the tuned model is at its native steps than at more steps, relative to the untuned model.

    (tuned_native / tuned_many) / (untuned_native / untuned_many) of Fréchet distances (lower = better) at the
    native and at a larger step count. 1 = few-step capacity kept; > 1 = the native step count degraded more than
    the many-step one. A change that multiplies every step count's distance by the same factor (a model that
    paints the fill everywhere) cancels; it equals fd_ratio@native / fd_ratio@many of the step curve.
    """
    values = (tuned_native, tuned_many, untuned_native, untuned_many)
    if not all(v > 0 for v in values):
        raise ValueError(f"expected four positive Fréchet distances (tuned and untuned at native and more steps), "
                         f"got {values}")
    return (tuned_native / tuned_many) / (untuned_native / untuned_many)
