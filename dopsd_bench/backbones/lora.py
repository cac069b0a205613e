"""LoRA adapters on a diffusers pipeline's denoiser through peft, saved in the diffusers LoRA format.

Shared by the backbone adapters: they set `lora_targets` (which modules get LoRA) and keep `pipe` and `denoiser`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch


class DiffusersLora:
    lora_targets: str | list[str] = ""

    def add_lora(self, name: str, rank: int, alpha: float | None = None) -> None:
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                            target_modules=self.lora_targets)
        with warnings.catch_warnings():  # a second adapter (D-OPSD's teacher) is what we mean: peft warns of it
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            self.denoiser.add_adapter(config, adapter_name=name)
        self._lora_to_fp32(name)
        self.set_adapter(name)

    def _lora_to_fp32(self, name: str) -> None:
        """Keep adapter `name` in fp32 on bf16/fp16 weights (peft creates it in the base layer's dtype): its updates
        and optimiser state stay exact, and peft casts each layer's input to the adapter's dtype."""
        for p in self.lora_parameters(name):
            p.data = p.data.float()

    def _lora_layers(self) -> list:
        """peft's tuner layers in the denoiser, found once per set of adapters."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        key = tuple(getattr(self.denoiser, "peft_config", {}))
        cached = getattr(self, "_lora_layer_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)])
            self._lora_layer_cache = cached
        return cached[1]

    def set_adapter(self, name: str | None) -> None:
        """Activate adapter `name` (None = no adapter), as diffusers' set_adapter/disable_adapters do at weight 1,
        but straight on peft's layers: D-OPSD switches student/teacher several times per step, and the
        model-level calls cost tens of milliseconds each on a small model."""
        if not getattr(self.denoiser, "_hf_peft_config_loaded", False):
            if name is None:
                return
            raise ValueError(f"no LoRA adapter {name!r} on the model; add it with add_lora or load_lora first")
        if name is not None and name not in self.denoiser.peft_config:
            raise ValueError(f"no LoRA adapter {name!r} on the model; it has {list(self.denoiser.peft_config)}")
        for layer in self._lora_layers():
            if name is None:
                layer.enable_adapters(False)
                continue
            if layer.disable_adapters:
                layer.enable_adapters(True)
            layer.set_adapter(name)

    @contextlib.contextmanager
    def merged_adapter(self, name: str) -> Iterator[None]:
        """Within, the denoiser computes as with `set_adapter(name)`, but with the adapter folded into the base
        weights and the adapters off: one matmul per layer instead of three, and none of peft's per-layer Python.
        For no-grad passes only, while no autograd graph holds the base weights (they change in place, and are
        restored bit for bit on exit). Outputs equal the unmerged ones up to float rounding."""
        from peft.tuners.lora import LoraLayer

        saved = []
        with torch.no_grad():
            for layer in self._lora_layers():
                if isinstance(layer, LoraLayer) and name in layer.lora_A:
                    weight = layer.get_base_layer().weight
                    saved.append((weight, weight.detach().clone()))
                    weight.add_(layer.get_delta_weight(name))
        self.set_adapter(None)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)
            self.set_adapter(name)

    def save_lora(self, path: str | Path, name: str) -> None:
        """`transformer.`-prefixed peft keys, plus the adapter config as metadata so that `load_lora_weights`
        restores lora_alpha (the scale) and not only the rank."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser, adapter_name=name)
        type(self.pipe).save_lora_weights(str(path), transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=self.denoiser.peft_config[name].to_dict())

    def load_lora(self, path: str | Path, name: str) -> None:
        self.pipe.load_lora_weights(str(path), adapter_name=name)
        self._lora_to_fp32(name)
        self.set_adapter(name)
