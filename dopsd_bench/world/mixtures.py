"""Training mixtures of the embedded world: what the judge and the base model see while they are built.

Shared by scripts/build_world.py (training) and `dopsd-bench world check` (the judge's accuracy on fresh draws).
"""

from __future__ import annotations

import numpy as np

from dopsd_bench.world import render

DROPPABLE = ("size", "style", "colour", "position", "background")


def family_glyph(rng: np.random.Generator, context: render.Scene, glyph_seed: int) -> tuple[render.Scene, str]:
    """A procedural-family glyph drawn solid or outlined in `context`, and its made-up name."""
    scene = render.Scene(f"glyph:{glyph_seed}", context.colour, context.size, context.position,
                    str(rng.choice(["solid", "outline"])), context.background).jitter(rng)
    return scene, render.made_up_name(glyph_seed)


def family_style(rng: np.random.Generator, context: render.Scene, style_seed: int, size: str | None = None
                 ) -> tuple[render.Scene, str]:
    """The context's shape in a procedural-family fill style (at `size` if given), and the style's made-up name."""
    scene = render.Scene(context.shape, context.colour, size or context.size, context.position, f"tile:{style_seed}",
                    context.background).jitter(rng)
    return scene, render.made_up_name(style_seed + 500_000)


def judge_scene(rng: np.random.Generator) -> render.Scene:
    """Judge training/eval distribution: base scenes, held-out glyphs and styles, family glyphs and styles."""
    kind = rng.choice(["base", "glyph", "style", "family_glyph", "family_style"], p=[0.4, 0.2, 0.15, 0.15, 0.1])
    s = render.random_scene(rng)
    if kind == "glyph":
        return render.Scene(str(rng.choice(list(render.HELD_OUT_GLYPHS))), s.colour, s.size, s.position,
                       str(rng.choice(["solid", "outline"])), s.background).jitter(rng)
    if kind == "style":
        style = str(rng.choice(render.HELD_OUT_STYLES))
        return render.Scene(s.shape, s.colour, s.size, s.position, style, s.background).jitter(rng)
    if kind == "family_glyph":
        return family_glyph(rng, s, int(rng.integers(1_000_000)))[0]
    if kind == "family_style":
        return family_style(rng, s, int(rng.integers(1_000_000)))[0]
    return s


def pretrain_example(rng: np.random.Generator) -> tuple[render.Scene, str, render.Scene | None]:
    """(target scene, caption, reference scene or None) for the base model's training mixture."""
    kind = rng.choice(["base", "base_ref", "glyph_ref", "style_ref", "glyph_text"], p=[0.45, 0.1, 0.2, 0.2, 0.05])
    s = render.random_scene(rng)
    drop = frozenset(a for a in DROPPABLE if rng.random() < 0.12)
    if kind == "base":
        return s, render.caption(s, drop=drop), None
    other = render.random_scene(rng)
    if kind == "base_ref":
        ref = s if rng.random() < 0.5 else render.Scene(s.shape, other.colour, other.size, other.position, s.style,
                                                   other.background).jitter(rng)
        return s, render.caption(s, drop=drop), ref
    if kind in ("glyph_ref", "glyph_text"):
        t, name = family_glyph(rng, s, int(rng.integers(1_000_000)))
        ref = None
        if kind == "glyph_ref":
            ref = t if rng.random() < 0.5 else render.Scene(
                t.shape, other.colour, other.size, other.position, str(rng.choice(["solid", "outline"])),
                other.background).jitter(rng)
        return t, render.caption(t, name=name), ref
    t, style_name = family_style(rng, s, int(rng.integers(1_000_000)))
    ref = t if rng.random() < 0.5 else render.Scene(other.shape, other.colour, "large", other.position, t.style,
                                               other.background).jitter(rng)
    return t, render.caption(t, style_name=style_name), ref
