"""Training mixtures of the embedded world: what the judge and the base model see while they are built.

Shared by scripts/build_world.py (training) and `dopsd-bench world check` (the judge's accuracy on fresh draws).
"""

from __future__ import annotations

import numpy as np

from dopsd_bench.world import render as R

DROPPABLE = ("size", "style", "colour", "position", "background")


def judge_scene(rng: np.random.Generator) -> R.Scene:
    """Judge training/eval distribution: base scenes, held-out glyphs and styles, family glyphs and styles."""
    kind = rng.choice(["base", "glyph", "style", "family_glyph", "family_style"], p=[0.4, 0.2, 0.15, 0.15, 0.1])
    s = R.random_scene(rng)
    if kind == "glyph":
        return R.Scene(str(rng.choice(list(R.HELD_OUT_GLYPHS))), s.colour, s.size, s.position,
                       str(rng.choice(["solid", "outline"])), s.background).jitter(rng)
    if kind == "style":
        style = str(rng.choice(R.HELD_OUT_STYLES))
        return R.Scene(s.shape, s.colour, s.size, s.position, style, s.background).jitter(rng)
    if kind == "family_glyph":
        return R.Scene(f"glyph:{rng.integers(1_000_000)}", s.colour, s.size, s.position,
                       str(rng.choice(["solid", "outline"])), s.background).jitter(rng)
    if kind == "family_style":
        style = f"tile:{rng.integers(1_000_000)}"
        return R.Scene(s.shape, s.colour, s.size, s.position, style, s.background).jitter(rng)
    return s


def pretrain_example(rng: np.random.Generator) -> tuple[R.Scene, str, R.Scene | None]:
    """(target scene, caption, reference scene or None) for the base model's training mixture."""
    kind = rng.choice(["base", "base_ref", "glyph_ref", "style_ref", "glyph_text"], p=[0.45, 0.1, 0.2, 0.2, 0.05])
    s = R.random_scene(rng)
    drop = frozenset(a for a in DROPPABLE if rng.random() < 0.12)
    if kind == "base":
        return s, R.caption(s, drop=drop), None
    other = R.random_scene(rng)
    if kind == "base_ref":
        ref = s if rng.random() < 0.5 else R.Scene(s.shape, other.colour, other.size, other.position, s.style,
                                                   other.background).jitter(rng)
        return s, R.caption(s, drop=drop), ref
    if kind in ("glyph_ref", "glyph_text"):
        seed = int(rng.integers(1_000_000))
        style = str(rng.choice(["solid", "outline"]))
        t = R.Scene(f"glyph:{seed}", s.colour, s.size, s.position, style, s.background).jitter(rng)
        ref = None
        if kind == "glyph_ref":
            ref = t if rng.random() < 0.5 else R.Scene(
                t.shape, other.colour, other.size, other.position, str(rng.choice(["solid", "outline"])),
                other.background).jitter(rng)
        return t, R.caption(t, name=R.made_up_name(seed)), ref
    seed = int(rng.integers(1_000_000))
    t = R.Scene(s.shape, s.colour, s.size, s.position, f"tile:{seed}", s.background).jitter(rng)
    ref = t if rng.random() < 0.5 else R.Scene(other.shape, other.colour, "large", other.position, t.style,
                                               other.background).jitter(rng)
    return t, R.caption(t, style_name=R.made_up_name(seed + 500_000)), ref
