"""The geometry-drift figures' image moments (metrics/geometry.py), in closed form and on world renders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dopsd_bench.metrics.geometry import drift, salient_moments
from dopsd_bench.world import render as R


def _square(top: int, left: int, side: int, size: int = 32) -> torch.Tensor:
    x = torch.full((1, 3, size, size), -0.8)
    x[..., top:top + side, left:left + side] = 0.9
    return x


def test_a_square_reads_its_centre_and_radius():
    centre, radius = salient_moments(_square(8, 8, 8))
    assert centre.tolist() == [[0.375, 0.375]]  # pixels 8..15 of 32: centre 12 / 32
    assert radius.item() == pytest.approx(((8**2 - 1) / 12 * 2) ** 0.5 / 32)  # discrete uniform, both axes


def test_twice_the_side_is_one_doubling_and_a_shift_is_its_distance():
    scale, offset = drift(torch.cat([_square(8, 8, 16), _square(12, 16, 8)]), torch.cat([_square(8, 8, 8)] * 2))
    assert scale[0].item() == pytest.approx(np.log2(((16**2 - 1) / (8**2 - 1)) ** 0.5))  # ~1.0
    assert scale[1].item() == pytest.approx(0.0, abs=1e-12)
    assert offset.tolist() == pytest.approx([0.125 * 2**0.5, (0.25**2 + 0.125**2) ** 0.5])
    same_scale, same_offset = drift(_square(3, 5, 7), _square(3, 5, 7))
    assert same_scale.item() == 0 and same_offset.item() == 0


def test_world_renders_read_their_size_and_position_words():
    """Large over small (16 px over 10 px: 0.68 doublings) and left to right (11 px of 32) on renders with the
    world's background stripes, lighting ramp and every fill."""
    rng = np.random.default_rng(0)
    scales, offsets = [], []
    for _ in range(30):
        scene = R.random_scene(rng)
        small, large, right = (dataclasses.replace(scene, size=z, position=p)
                               for z, p in (("small", "left"), ("large", "left"), ("small", "right")))
        images = R.to_tensor_batch([R.render(s) for s in (small, large, right)])
        scale, offset = drift(images[1:], images[:1].expand(2, -1, -1, -1))
        scales.append(scale[0].item())
        offsets.append(offset[1].item())
    assert np.mean(scales) == pytest.approx(np.log2(16 / 10), abs=0.08)
    assert np.mean(offsets) == pytest.approx(11 / 32, abs=0.02)


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="one target per sample"):
        drift(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8))
