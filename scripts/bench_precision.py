"""Step time at each dtype and with gradient checkpointing, and evaluation sampling batched vs at once; prints ratios.

Runs the SFT objective through the shared loop's mixed precision (dopsd_bench.train.MixedPrecision) on the embedded
model (or a tiny random FLUX.2-klein with --tiny), one thread by default, medians over --steps steps after a warm-up.

    nice -n 19 env OMP_NUM_THREADS=1 python scripts/bench_precision.py --tiny --steps 20
    python scripts/bench_precision.py --device cuda --steps 50          # on a GPU: bf16 is the default there
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def load(tiny: bool, device: str, dtype: str, checkpointing: bool):
    from dopsd_bench.backbones import load_backbone
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
    from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline
    from dopsd_bench.runconfig import torch_dtype

    if tiny:
        pipe, settings = tiny_flux2_klein_pipeline(seed=0)
        backbone = Flux2KleinBackbone(pipe.to(torch_dtype(dtype)), settings, "tiny", device=device)
    else:
        backbone = load_backbone("flux2-klein", device=device, dtype=torch_dtype(dtype))
    if checkpointing:
        backbone.enable_gradient_checkpointing()
    return backbone


def step_seconds(backbone, dtype: str, steps: int, batch_size: int) -> float:
    from dopsd_bench.method import Batch
    from dopsd_bench.runner import build_method
    from dopsd_bench.train import MixedPrecision

    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, backbone.resolution, backbone.resolution, generator=g) * 2 - 1
    batch = Batch(images=images, captions=["a red circle on the left"] * batch_size)
    method = build_method("sft", {})
    method.setup(backbone, batch, 8, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4)
    amp = MixedPrecision(dtype, backbone.device)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast():
            method.loss_and_backward(batch, g, amp.backward(torch.Tensor.backward))
        amp.step(optimizer)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def sample_seconds(backbone, n: int, batch_size: int | None) -> float:
    prompts, seeds = ["a small blue square"] * n, list(range(n))
    bs = batch_size or n
    t = time.perf_counter()
    for i in range(0, n, bs):
        backbone.sample(prompts[i:i + bs], seeds[i:i + bs])
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random FLUX.2-klein instead of the embedded model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64, help="images sampled for the evaluation batching figure")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32+ckpt": ("fp32", True)}
    step = {}
    for label, (dtype, ckpt) in runs.items():
        backbone = load(args.tiny, args.device, dtype, ckpt)
        step[label] = step_seconds(backbone, dtype, args.steps, args.batch_size)
        print(f"{label:>10}: {step[label] * 1e3:8.1f} ms/step (SFT, batch {args.batch_size}, median of {args.steps})")
    print(f"bf16 / fp32 step time: {step['bf16'] / step['fp32']:.2f}")
    print(f"checkpointing / plain step time (fp32): {step['fp32+ckpt'] / step['fp32']:.2f}")

    backbone = load(args.tiny, args.device, "fp32", False)
    sample_seconds(backbone, 4, None)  # warm-up
    at_once = sample_seconds(backbone, args.samples, None)
    by_16 = sample_seconds(backbone, args.samples, 16)
    print(f"sampling {args.samples} images: all at once {at_once:.2f} s, batches of 16 {by_16:.2f} s "
          f"(ratio {by_16 / at_once:.2f})")


if __name__ == "__main__":
    main()
