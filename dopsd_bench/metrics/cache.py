"""On-disk cache of the untuned model's outputs, shared by every method and run that scores on the same backbone.

The untuned model's samples on the fixed evaluation prompts and seeds are the same for every method, so they are
computed once and stored as safetensors. The key is a hash of the backbone identity (`backbone.name` +
`backbone.model_id`, or a fingerprint of the denoiser's non-LoRA weights when the backbone has no `model_id`),
what was computed (`kind`), prompts, seeds, steps and the reference images' bytes.

    cache = SampleCache("runs/.cache", backbone)
    images = cache.get_or_compute("sample", prompts, seeds, 4, None, lambda: backbone.sample(prompts, seeds, 4))
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CACHE_VERSION = 1


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def cache_identity(backbone) -> str:
    """The sample cache's key for a backbone: name + model_id (+ the weights' dtype unless fp32); without a model_id,
    a fingerprint of the denoiser's base (non-LoRA) weights."""
    name = getattr(backbone, "name", "") or type(backbone).__name__
    model_id = getattr(backbone, "model_id", None)
    if model_id:
        dtype = _weights_dtype(backbone)  # bf16 weights sample other images than fp32 ones: another cache entry
        return f"{name}:{model_id}" + ("" if dtype in (None, torch.float32) else f":{str(dtype).split('.')[-1]}")
    h = hashlib.sha256()
    denoiser = getattr(backbone, "denoiser", None)
    if denoiser is None:
        raise ValueError(f"backbone {name!r} has neither `model_id` nor a `denoiser` to fingerprint; set "
                         "backbone.model_id to a string that changes when its weights change")
    with torch.no_grad():
        for pname, p in denoiser.named_parameters():
            if "lora_" in pname:
                continue
            pname = pname.replace(".base_layer", "")  # peft renames wrapped layers once an adapter exists
            flat = p.detach().reshape(-1)
            h.update(f"{pname}{tuple(p.shape)}{float(flat.double().sum()):.10e}".encode())
            h.update(flat[:64].to("cpu", torch.float32).numpy().tobytes())
    return f"{name}:weights-{h.hexdigest()[:16]}"


def _weights_dtype(backbone) -> torch.dtype | None:
    denoiser = getattr(backbone, "denoiser", None)
    if denoiser is None:
        return None
    return next((p.dtype for n, p in denoiser.named_parameters() if p.is_floating_point() and "lora_" not in n), None)


class SampleCache:
    """Tensors keyed by (backbone, kind, prompts, seeds, steps, references); `root=None` keeps them in memory."""

    def __init__(self, root: str | Path | None, backbone):
        self.root = Path(root) if root is not None else None
        self.identity = cache_identity(backbone)
        self.resolution = getattr(backbone, "resolution", None)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, prompts: list[str], seeds: list[int], steps: int,
            references: torch.Tensor | None) -> str:
        spec = {"v": CACHE_VERSION, "backbone": self.identity, "resolution": self.resolution, "kind": kind,
                "prompts": list(prompts), "seeds": [int(s) for s in seeds], "steps": int(steps),
                "references": None if references is None else tensor_digest(references)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key[:32]}.safetensors"

    def get_or_compute(self, kind: str, prompts: list[str], seeds: list[int], steps: int,
                       references: torch.Tensor | None, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = self.key(kind, prompts, seeds, steps, references)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.path(key)
        if path is not None and path.exists():
            value = self._read(path)
            if value is not None:
                self.hits += 1
                self._memory[key] = value
                return value
        self.misses += 1
        value = compute().detach().to("cpu").contiguous()
        self._memory[key] = value
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            meta = {"backbone": self.identity, "kind": kind, "steps": str(steps), "n": str(len(prompts)),
                    "sha256": tensor_digest(value)}
            try:
                save_file({"value": value}, str(tmp), metadata=meta)
                os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
            except (OSError, SafetensorError) as e:  # a full disk: the value is computed, only its reuse is lost
                tmp.unlink(missing_ok=True)
                print(f"warning: could not write the sample cache entry {path}: {e}", file=sys.stderr)
        return value

    @staticmethod
    def _read(path: Path) -> torch.Tensor | None:
        """The cached tensor, or None (the file deleted, with a warning) when it is corrupt: unreadable, or its
        bytes not those it was written with."""
        try:
            with safe_open(str(path), "pt") as f:
                digest = (f.metadata() or {}).get("sha256")
                value = f.get_tensor("value")
            if digest is not None and tensor_digest(value) != digest:
                raise ValueError("its content does not match the digest written with it")
            return value
        except (OSError, ValueError, SafetensorError) as e:
            print(f"warning: sample cache entry {path} is corrupt ({e}); deleting it and computing it again",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            return None
