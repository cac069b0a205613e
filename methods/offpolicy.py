"""`offpolicy` (paper ablation): D-OPSD's teacher supervision on forward-noised data states instead of the student's
own roll-out. At each of the K native-schedule sigmas (the states D-OPSD would visit), x = add_noise(x0, eps, sigma)
with fresh noise per state; the teacher (same adapters, EMA, context and loss as `dopsd`) predicts with text + the
target image, the student with text. Isolates the "on-policy" part of D-OPSD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from dopsd_bench import flow
from dopsd_bench.method import Batch
from dopsd_bench.registry import METHODS

from .dopsd import DOPSD, DOPSDConfig, _Step


@METHODS.register("offpolicy", description="dopsd's teacher loss on forward-noised data states (paper ablation)")
class OffPolicy(DOPSD):
    name = "offpolicy"
    description = "dopsd's teacher loss on forward-noised data states (paper ablation)"
    Config = DOPSDConfig
    needs_data_latents: ClassVar[bool] = True

    def _rollout(self, st: _Step) -> list[torch.Tensor]:
        return [flow.add_noise(st.x0, st.eps[k], st.sigmas[k]) for k in range(len(st.sigmas) - 1)]

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        st = self._prepare(batch, generator)
        return self._batched(st, self._rollout(st), None, None)

    def loss_and_backward(self, batch: Batch, generator: torch.Generator,
                          backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        # no roll-out to fuse with: "sequential" is the batched path one state at a time
        chunk = 1 if self.config.schedule == "sequential" else self.config.chunk
        st = self._prepare(batch, generator)
        return self._batched(st, self._rollout(st), backward or torch.Tensor.backward, chunk)
