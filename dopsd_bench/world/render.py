"""The procedural image world: attributes -> 32x32 RGB image, with the true attributes known for every pixel.

A scene is one object described by shape, colour, size, position, style and background (what captions say),
rendered with factors no caption mentions (position/size jitter, rotation, background stripes, a lighting ramp,
brightness), so that p(image | prompt) is spread out and few-step sampling needs distillation.

Vocabulary:
- base: SHAPES x COLOURS x SIZES x POSITIONS x STYLES x BACKGROUNDS (pretraining, retention prompts);
- held-out concepts: HELD_OUT_GLYPHS, 5x5 glyphs never seen in pretraining, each named by a new token;
- held-out styles: HELD_OUT_STYLES, fill patterns never seen in pretraining;
- a procedural family of random glyphs and fill styles with made-up names, used only to teach in-context copying.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

RES = 32
SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond"]
COLOURS = {
    "red": (0.9, 0.12, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.15, 0.85), "cyan": (0.1, 0.85, 0.9), "orange": (0.98, 0.55, 0.05),
}
SIZES = {"small": 10.0, "large": 16.0}
POSITIONS = {"left": (10.5, 16.0), "right": (21.5, 16.0), "top": (16.0, 10.5), "bottom": (16.0, 21.5)}
BACKGROUNDS = {"dark": 0.12, "light": 0.72}
STYLES = ["solid", "outline", "striped"]
HELD_OUT_STYLES = ["dotted", "checkered"]
# held-out concepts: token -> seed of its 5x5 glyph (the seeds lie outside the family's seed range)
HELD_OUT_GLYPHS = {"zorb": 1_000_001, "kwel": 1_000_002, "fenx": 1_000_003, "drup": 1_000_004}
OTHER = "other"  # judge label for family glyphs/styles that are neither base nor held-out
JUDGE_SHAPES = SHAPES + list(HELD_OUT_GLYPHS) + [OTHER]
JUDGE_STYLES = STYLES + HELD_OUT_STYLES + [OTHER]
ATTRIBUTES = {
    "shape": JUDGE_SHAPES, "colour": list(COLOURS), "size": list(SIZES), "position": list(POSITIONS),
    "style": JUDGE_STYLES, "background": list(BACKGROUNDS),
}
# how far the unsaid factors on the object spread: rotation (+- degrees), scale (+- fraction), position (+- px).
# Off in the world the models are built on: with them on, a CPU-sized base did not learn its shapes
# (docs/world.md); the renderer keeps them for experiments (scripts/build_world.py --unsaid)
UNSAID = {"angle": 0.0, "scale": 0.0, "shift": 0.0}
_NAME_SYLLABLES = ["ba", "ko", "mu", "tu", "ve", "zo", "lo", "qi", "su", "fe", "di", "yo", "ja", "wu", "xu", "ke"]


def glyph_bitmap(seed: int) -> np.ndarray:
    """A connected-looking random 5x5 glyph (about half the cells on, never empty or full)."""
    rng = np.random.default_rng(seed)
    while True:
        g = rng.random((5, 5)) < 0.5
        if 9 <= g.sum() <= 17 and g.any(0).all() and g.any(1).all():
            return g


def style_tile(seed: int) -> np.ndarray:
    """A random 4x4 fill tile for the procedural style family (never one of the named patterns)."""
    rng = np.random.default_rng(seed + 7_000_000)
    named = {_tile("striped").tobytes(), _tile("dotted").tobytes(), _tile("checkered").tobytes()}
    while True:
        t = rng.random((4, 4)) < 0.5
        if 5 <= t.sum() <= 11 and not any(np.roll(t, (i, j), (0, 1)).tobytes() in named
                                           for i in range(4) for j in range(4)):
            return t


def _tile(style: str) -> np.ndarray:
    yy, xx = np.mgrid[0:4, 0:4]
    return {"striped": yy % 4 != 3, "dotted": (yy < 2) & (xx < 2),
            "checkered": ((yy // 2) + (xx // 2)) % 2 == 0}[style]


def made_up_name(seed: int) -> str:
    rng = np.random.default_rng(seed + 3_000_000)
    name = "".join(rng.choice(_NAME_SYLLABLES, size=2))
    return name if name not in HELD_OUT_GLYPHS else name + "o"


@dataclass(frozen=True)
class Scene:
    shape: str  # a base shape, a held-out glyph token, or "glyph:<seed>" for the family
    colour: str
    size: str
    position: str
    style: str  # a base or held-out style, or "tile:<seed>" for the family
    background: str
    # unsaid factors, drawn by `jitter`
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0
    brightness: float = 1.0
    bg_angle: float = 0.0
    bg_freq: float = 0.5
    bg_phase: float = 0.0
    ramp: tuple[float, float] = field(default=(0.0, 0.0))

    def jitter(self, rng: np.random.Generator) -> Scene:
        return replace(
            self, dx=float(rng.uniform(-UNSAID["shift"], UNSAID["shift"])),
            dy=float(rng.uniform(-UNSAID["shift"], UNSAID["shift"])),
            scale=float(rng.uniform(1 - UNSAID["scale"], 1 + UNSAID["scale"])),
            angle=float(rng.uniform(-UNSAID["angle"], UNSAID["angle"])), brightness=float(rng.uniform(0.8, 1.1)),
            bg_angle=float(rng.uniform(0, math.pi)), bg_freq=float(rng.uniform(0.3, 1.2)),
            bg_phase=float(rng.uniform(0, 2 * math.pi)), ramp=(float(rng.uniform(-0.1, 0.1)),
                                                               float(rng.uniform(-0.1, 0.1))))

    def judge_labels(self) -> dict[str, int]:
        shape = self.shape if self.shape in JUDGE_SHAPES else OTHER
        style = self.style if self.style in JUDGE_STYLES else OTHER
        values = {"shape": shape, "colour": self.colour, "size": self.size, "position": self.position,
                  "style": style, "background": self.background}
        return {k: ATTRIBUTES[k].index(v) for k, v in values.items()}


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the unit shape; u, v are object-frame coordinates in [-1, 1]."""
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        return r <= 1.0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v <= 0.8) & (v >= 1.9 * np.abs(u) - 1.0)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    seed = HELD_OUT_GLYPHS.get(shape)
    if seed is None:
        if not shape.startswith("glyph:"):
            raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES + list(HELD_OUT_GLYPHS)} "
                             "or glyph:<seed>")
        seed = int(shape.split(":", 1)[1])
    g = glyph_bitmap(seed)
    inside = (np.abs(u) < 1.0) & (np.abs(v) < 1.0)
    iu = np.clip(((u + 1) / 2 * 5).astype(int), 0, 4)
    iv = np.clip(((v + 1) / 2 * 5).astype(int), 0, 4)
    return inside & g[iv, iu]


def _style_fill(style: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray | None:
    """The fill pattern in image coordinates; None for solid/outline (handled by the mask)."""
    if style in ("solid", "outline"):
        return None
    if style in ("striped", "dotted", "checkered"):
        tile = _tile(style)
    elif style.startswith("tile:"):
        tile = style_tile(int(style.split(":", 1)[1]))
    else:
        raise ValueError(f"unknown style {style!r}: expected one of {STYLES + HELD_OUT_STYLES} or tile:<seed>")
    return tile[yy.astype(int) % 4, xx.astype(int) % 4]


def render(scene: Scene) -> np.ndarray:
    """Render a scene to float32 RGB in [0, 1], shape (RES, RES, 3)."""
    yy, xx = np.mgrid[0:RES, 0:RES].astype(np.float32) + 0.5
    # background: base grey level, faint stripes and a lighting ramp (all unsaid)
    base = BACKGROUNDS[scene.background]
    stripes = 0.05 * np.sin(scene.bg_freq * (np.cos(scene.bg_angle) * xx + np.sin(scene.bg_angle) * yy)
                            + scene.bg_phase)
    ramp = scene.ramp[0] * (xx / RES - 0.5) + scene.ramp[1] * (yy / RES - 0.5)
    img = np.repeat((base + stripes + ramp)[..., None], 3, axis=2)
    # object frame
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.dx, cy + scene.dy
    half = SIZES[scene.size] * scene.scale / 2
    a = math.radians(scene.angle)
    ox, oy = (xx - cx) / half, (yy - cy) / half
    u = math.cos(a) * ox + math.sin(a) * oy
    v = -math.sin(a) * ox + math.cos(a) * oy
    mask = _shape_mask(scene.shape, u, v)
    if scene.style == "outline":
        mask = mask & ~_shape_mask(scene.shape, u / 0.6, v / 0.6)
    fill = _style_fill(scene.style, xx - cx + 64, yy - cy + 64)
    if fill is not None:
        mask = mask & fill
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32) * scene.brightness
    img[mask] = colour
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def caption(scene: Scene, name: str | None = None, style_name: str | None = None,
            drop: frozenset[str] = frozenset()) -> str:
    """The caption of a scene. `name`/`style_name` replace family glyph/style ids; `drop` omits attributes."""
    shape = name or scene.shape
    style = style_name or scene.style
    words = ["a"]
    if "size" not in drop:
        words.append(scene.size)
    if "style" not in drop:
        words.append(style)
    if "colour" not in drop:
        words.append(scene.colour)
    words.append(shape)
    if "position" not in drop:
        words += ["at", "the", scene.position]
    text = " ".join(words)
    if "background" not in drop:
        text += f", {scene.background} background"
    return text


def random_scene(rng: np.random.Generator, shapes=None, styles=None) -> Scene:
    """A base-vocabulary scene (or one drawn from the given shapes/styles), with random unsaid factors."""
    shapes = shapes or SHAPES
    styles = styles or STYLES
    shape = str(rng.choice(shapes))
    if shape == "ring":  # an outlined ring is pixel for pixel an outlined circle: the world never draws one
        styles = [s for s in styles if s != "outline"] or styles
    return Scene(shape=shape, colour=str(rng.choice(list(COLOURS))),
                 size=str(rng.choice(list(SIZES))), position=str(rng.choice(list(POSITIONS))),
                 style=str(rng.choice(styles)), background=str(rng.choice(list(BACKGROUNDS)))).jitter(rng)


def to_tensor_batch(images: list[np.ndarray]):
    """List of HxWx3 [0,1] arrays -> torch (B, 3, H, W) in [-1, 1]."""
    import torch

    arr = np.stack(images).transpose(0, 3, 1, 2)
    return torch.from_numpy(arr) * 2 - 1
