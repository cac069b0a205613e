"""The method contract: a small object with an objective; the training loop (dopsd_bench/train.py) is shared.

A method never computes a metric and never owns an optimiser: the loop asks it for `trainable_parameters`,
calls `loss_and_backward(batch, generator, backward)` every step (by default: `loss(batch)` then one backward),
`after_step(step)` after each optimiser step and `finish()` after the last. How the trained model is
sampled for scoring is also the method's (`sample`), so `icl` can use the in-context teacher path.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch

from dopsd_bench.backbones.base import Backbone


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]
    token: str = ""  # the task's new token (TaskData.token); dreambooth derives its class prompts from it


@dataclass
class MethodConfig:
    """Base for method configs: dataclasses that validate themselves in __post_init__."""

    def __post_init__(self) -> None:
        pass

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    trains: ClassVar[bool] = True  # False for methods with nothing to train (base, icl)
    adapter: ClassVar[str | None] = "student"  # the adapter that is saved and sampled (None: full fine-tune)
    default_lr: ClassVar[float | None] = None  # overrides the loop's default lr when the user gives none
    # whether a sequence (dopsd_bench/continual.py) can tune it round after round: its trained state is LoRA adapters
    # on the backbone, which carry from one round to the next; False for full fine-tunes and methods on other models
    continual: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None):
        self.config = config or self.Config()
        self.backbone: Backbone | None = None

    def setup(self, backbone: Backbone, train: Batch, rank: int, generator: torch.Generator) -> None:
        """Attach adapters and precompute anything the objective needs, before the first step. An adapter that is
        already on the backbone (carried from a sequence's earlier round) trains on from where it is."""
        self.backbone = backbone
        if self.trains and has_adapter(backbone, self.adapter):
            backbone.set_adapter(self.adapter)
        elif self.trains:
            backbone.add_lora(self.adapter, rank=rank)

    @property
    def changes_base_weights(self) -> bool:
        """Whether training changes the model itself (no adapter: a full fine-tune), so that the untuned model's
        outputs must be computed before it trains."""
        return self.trains and self.adapter is None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.backbone.lora_parameters(self.adapter)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def loss_and_backward(self, batch: Batch, generator: torch.Generator,
                          backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """One step's gradients: calls `backward` (default: Tensor.backward; the loop passes accelerator.backward)
        on the objective, possibly in several pieces whose gradients sum to those of `loss`, so that a method can
        free activations early (dopsd). Returns the detached loss value for logging."""
        loss = self.loss(batch, generator)
        (backward or torch.Tensor.backward)(loss)
        return loss.detach()

    def graph_rows(self, batch_size: int, native_steps: int) -> int:
        """Rows of the largest denoiser forward whose autograd graph one training step keeps alive (`plan`'s memory
        estimate): the batch, for a method with one forward per step."""
        return batch_size

    def teacher_rows(self, batch_size: int, native_steps: int) -> int:
        """Rows of the largest no-grad forward with the teacher's (reference) conditioning one training step runs
        while no graph is alive (`plan`'s memory estimate counts its transient peak); 0 for none."""
        return 0

    def teacher_pass_folded(self) -> bool:
        """Whether that pass runs with its adapter folded into the weights (no LoRA branch in the forward)."""
        return False

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        """Called once after the last training step, before saving and sampling (base-transfer moves its LoRA)."""

    def sample(self, prompts: list[str], seeds: list[int], steps: int | None = None,
               references: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] from the tuned model (text only, as a user would sample it)."""
        self.backbone.set_adapter(self.adapter if self.trains else None)
        return self.backbone.sample(prompts, seeds, steps)


def has_adapter(backbone: Backbone, name: str | None) -> bool:
    """Whether LoRA adapter `name` is on the backbone's denoiser (peft keeps one config per adapter)."""
    return name is not None and name in (getattr(backbone.denoiser, "peft_config", None) or {})


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, tp, text: str):
    """Parse `text` as a value of type `tp` (bool, int, float, str, Literal, or an Optional of one)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        return _convert(name, args[0], text)
    if origin is Literal:
        allowed = typing.get_args(tp)
        for value in allowed:
            if str(value) == text:
                return value
        raise ValueError(f"{name}={text!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{name}={text!r} is not a boolean; use true or false")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not {'an integer' if tp is int else 'a number'}") from None
    if tp is str:
        return text
    raise ValueError(f"{name} has type {tp} which cannot be set from the command line")


def config_from_overrides(config_cls: type[MethodConfig], overrides: dict[str, str]) -> MethodConfig:
    """Build `config_cls` from `--set key=value` strings, converted by each field's type (and validated).

    Raises ValueError naming the allowed fields or values, e.g. for an unknown key or a bad number.
    """
    hints = typing.get_type_hints(config_cls)
    names = config_cls.field_names()
    kwargs = {}
    for key, text in overrides.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown setting {key!r} for {config_cls.__qualname__}{hint}; "
                             f"allowed: {', '.join(names) or '(none)'}")
        kwargs[key] = _convert(key, hints[key], str(text))
    return config_cls(**kwargs)
