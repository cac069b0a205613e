"""Task data from the embedded world: training sets, evaluation and retention prompts, all from fixed seeds.

Held-out concepts (glyph tokens) and styles are rendered in base-vocabulary contexts; retention prompts are base
combinations that no task's training or evaluation prompt uses (a fixed hash split of the base grid).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from dopsd_bench.world import render


def _combo_key(c: tuple) -> int:
    return zlib.crc32("|".join(c).encode())


def is_retention_combo(colour: str, size: str, position: str, background: str) -> bool:
    """The context split: retention prompts use these contexts, tasks use the others."""
    return _combo_key((colour, size, position, background)) % 4 == 0


def instance_scene(family: str, instance: str, rng: np.random.Generator, retention: bool = False) -> render.Scene:
    """A scene of the held-out concept/style in a random base context (task contexts unless `retention`)."""
    while True:
        s = render.random_scene(rng)
        size = "large" if family == "style" else s.size  # fill patterns need the large size to be seen
        if is_retention_combo(s.colour, size, s.position, s.background) == retention:
            break
    if family == "concept":
        if instance not in render.HELD_OUT_GLYPHS:
            raise ValueError(f"unknown world concept {instance!r}: expected one of {list(render.HELD_OUT_GLYPHS)}")
        style = str(rng.choice(["solid", "outline"]))  # glyph detail is lost in stripes at 32 px
        return render.Scene(instance, s.colour, s.size, s.position, style, s.background).jitter(rng)
    if family == "style":
        if instance not in render.HELD_OUT_STYLES:
            raise ValueError(f"unknown world style {instance!r}: expected one of {render.HELD_OUT_STYLES}")
        return render.Scene(s.shape, s.colour, size, s.position, instance, s.background).jitter(rng)
    raise ValueError(f"unknown family {family!r}: expected 'concept' or 'style'")


def scene_targets(scene: render.Scene) -> dict[str, str]:
    return {"shape": scene.shape, "colour": scene.colour, "size": scene.size, "position": scene.position,
            "style": scene.style, "background": scene.background}


def training_set(family: str, instance: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n training images of the held-out concept/style with their captions (the token is the instance name)."""
    rng = np.random.default_rng(seed)
    scenes = [instance_scene(family, instance, rng) for _ in range(n)]
    return render.to_tensor_batch([render.render(s) for s in scenes]), [render.caption(s) for s in scenes]


def eval_prompts(family: str, instance: str, n: int, seed: int) -> tuple[list[str], list[dict[str, str]]]:
    """n prompts that use the token in new contexts, with the attributes a correct image has."""
    rng = np.random.default_rng(seed + 1)
    scenes = [instance_scene(family, instance, rng) for _ in range(n)]
    return [render.caption(s) for s in scenes], [scene_targets(s) for s in scenes]


def retention_prompts(n: int, seed: int) -> tuple[list[str], list[dict[str, str]], torch.Tensor]:
    """n base-vocabulary prompts from the retention split, their attributes and one true render each."""
    rng = np.random.default_rng(seed + 2)
    scenes = [render.random_scene(rng) for _ in range(50 * n)]
    scenes = [s for s in scenes if is_retention_combo(s.colour, s.size, s.position, s.background)][:n]
    return ([render.caption(s) for s in scenes], [scene_targets(s) for s in scenes],
            render.to_tensor_batch([render.render(s) for s in scenes]))


def true_renders(targets: list[dict[str, str]], seed: int) -> torch.Tensor:
    """Fresh true renders of given attribute sets (new unsaid factors), for Fréchet references."""
    rng = np.random.default_rng(seed + 3)
    return render.to_tensor_batch([render.render(render.Scene(**t).jitter(rng)) for t in targets])
