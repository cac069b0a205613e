"""What one training step costs in FLOPs: counted once per run, then multiplied by the steps taken.

torch.utils.flop_counter.FlopCounterMode counts matmuls, convolutions and attention (element-wise ops are not
counted) over one step exactly as the training loop runs it (`Method.loss_and_backward`: forward and backward, the
text encoders where a step runs them, and any teacher pass). The count is a dispatch-level trace, slower than a
plain step, which is why the loop counts one step before training instead of every step. The training loop
(dopsd_bench/train.py) turns a FLOP budget into steps with it and records the FLOPs spent; scripts/bench_step.py and
scripts/bench_gpu.py compare methods with it.

    python -c "import dopsd_bench.cost as c; print(c.steps_for_flops(2e13, 3.1e9))"
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from dopsd_bench.method import Batch, Method


@contextlib.contextmanager
def _no_grouped_query_attention() -> Iterator[None]:
    """transformers' attention (text encoders, Z-Image's VL teacher) runs grouped-query SDPA with fewer key/value heads
    when it can; older torch's counter rejects those shapes ("query/key/value shapes are incompatible": z-image with
    torch 2.11 on an H200). Counting with the key/value heads repeated, as transformers does where it cannot, gives the
    same FLOPs on every torch (tests/test_scripts.py checks that). A model that never imported transformers' SDPA
    integration runs none of it, so it is patched only when loaded."""
    sdpa = sys.modules.get("transformers.integrations.sdpa_attention")
    if sdpa is None or not hasattr(sdpa, "use_gqa_in_sdpa"):
        yield
        return
    from unittest import mock

    with mock.patch.object(sdpa, "use_gqa_in_sdpa", return_value=False):
        yield


def step_flops(method: Method, batch: Batch, generator: torch.Generator | None = None) -> int:
    """FLOPs of one training step of a set-up `method` on `batch` (one process's share under multi-GPU).

    The step leaves no trace on training: the global RNG states are restored, the gradients it made are dropped, and
    there is no optimiser step and no `after_step` (an EMA update is element-wise: it counts 0 FLOPs anyway). What is
    counted is a steady-state step: one uncounted pass on `batch` first fills what a run computes once and then
    caches (a backbone's prompt encodings), as a run's first step does. Otherwise the count would include the text
    encoder for whichever captions were not yet cached, and vary with the minibatch drawn. Past that, the FLOPs
    depend on shapes only, so any batch of the training batch's size gives the count."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    params = list(method.trainable_parameters())
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices), _no_grouped_query_attention():
            method.loss_and_backward(batch, generator)  # uncounted: fills the caches
            for p in params:
                p.grad = None
            with FlopCounterMode(display=False) as counter:
                method.loss_and_backward(batch, generator)
    finally:
        random.setstate(python_state)
        for p in params:
            p.grad = None
    return int(counter.get_total_flops())


def steps_for_flops(budget_flops: float, flops_per_step: int) -> int:
    """The steps a FLOP budget buys: floor(budget / flops per step), at least 1 (a budget below one step's cost
    still trains one step, so every cell has an adapter)."""
    if flops_per_step <= 0:
        raise ValueError(f"cannot turn a FLOP budget into steps: one step counted {flops_per_step} FLOPs (the counter "
                         "sees matmuls, convolutions and attention only); give the budget in --steps instead")
    return max(1, math.floor(budget_flops / flops_per_step))
