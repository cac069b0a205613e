"""Cost of one D-OPSD training step relative to one SFT step, on 2 CPU threads: time, FLOPs and activation memory.

    python scripts/bench_step.py                       # embedded glyphworld model if built, else the tiny Flux2
    python scripts/bench_step.py --model tiny --batch 4 --repeats 3 --mem-batch 8     # quick (~1 min)
    python scripts/bench_step.py --model random --width 128     # glyphworld's architecture, a 2x wider DiT
    python scripts/bench_step.py --model tiny --repeats 2 --levers   # also bf16 autocast and torch.compile (~2 min)

Both methods run through `Method.loss_and_backward` exactly as the training loop calls it, at equal batch size and
K = 4 roll-out states, with their default configs (plus `--set key=value` for dopsd, e.g. --set schedule=batched).
- time_ratio: D-OPSD step time / SFT step time, each the minimum over --repeats steps (steps interleaved, after a
  warm-up step; the minimum is the least disturbed by other processes on a shared machine; medians are printed too).
- flop_ratio: the same ratio in FLOPs counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions,
  attention; element-wise ops are not counted) over one step of each, by dopsd_bench.cost.step_flops (what the
  training loop records and a --budget-flops divides by).
- memory_ratio: peak bytes of tensors saved for backward (activations; parameters and buffers excluded), of our
  D-OPSD step over the naive step that keeps all K graphs alive until one backward (`DOPSD.loss`, the released
  loop), at --mem-batch. On the CPU there is no allocator peak counter, so this is measured with
  torch.autograd.graph.saved_tensors_hooks (each saved storage counted once while any graph holds it); transient
  no-grad activations (roll-out, teacher forward) are not in it.
- levers (--levers): each method's step time with bf16 autocast, with the denoiser's forward under torch.compile
  (inductor), and with both, over its fp32 eager step time (copies of the same method, steps interleaved), and the
  seconds the first compiled steps took (compilation), which a run pays once.
The last printed line is a JSON object with time_ratio, flop_ratio and memory_ratio (plus the details).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from dopsd_bench.cost import step_flops as flops  # FLOPs of one step, as the training loop counts them
from dopsd_bench.method import Batch, Method, config_from_overrides
from dopsd_bench.registry import METHODS
from dopsd_bench.train import DEFAULT_BUDGET

K = 4


def load(model: str, width: int):
    from dopsd_bench.backbones.flux2 import EMBEDDED, Flux2KleinBackbone
    from dopsd_bench.paths import assets_dir

    if model == "auto":
        model = "glyphworld" if (assets_dir() / EMBEDDED["glyphworld"] / "model_index.json").exists() else "tiny"
    if model in ("tiny", "random"):
        from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline

        # random: glyphworld's architecture as scripts/build_world.py builds it (2x-down VAE), at DiT width --width
        pipe, settings = (tiny_flux2_klein_pipeline(0) if model == "tiny"
                          else tiny_flux2_klein_pipeline(0, width=width, vae_channels=(16, 32)))
        label = model if model == "tiny" else f"random-width{width}"
        return label, lambda: Flux2KleinBackbone(copy.deepcopy(pipe), settings, label, device="cpu")
    return model, lambda: Flux2KleinBackbone.from_pretrained(model, device="cpu")


def make_batch(n: int, resolution: int) -> Batch:
    """n random images under the `style` task's training captions (what `plan --task style` sizes the text by)."""
    from dopsd_bench.tasks import load_task

    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
    captions = load_task("style").training_captions()
    return Batch(images=images, captions=[captions[i % len(captions)] for i in range(n)], token="")


def make_method(name: str, factory, batch: Batch, rank: int, overrides: dict[str, str]) -> Method:
    cls = METHODS.get(name)
    method = cls(config_from_overrides(cls.Config, overrides))
    if hasattr(method.config, "k"):
        method.config.k = K
    method.setup(factory(), batch, rank, torch.Generator().manual_seed(0))
    return method


def step(method: Method, batch: Batch, seed: int) -> None:
    for p in method.trainable_parameters():
        p.grad = None
    method.loss_and_backward(batch, torch.Generator().manual_seed(seed))
    method.after_step(1)


class SavedTensorPeak:
    """Peak bytes of distinct storages held by autograd graphs (saved for backward), excluding `exclude`."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.count, self.now, self.peak = exclude, {}, 0, 0

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.exclude or t.device.type == "meta":
            return t
        return t, _Held(self, ptr, t.untyped_storage().nbytes())

    @staticmethod
    def unpack(packed):
        return packed[0] if isinstance(packed, tuple) else packed

    def add(self, ptr: int, nbytes: int) -> None:
        self.count[ptr] = self.count.get(ptr, 0) + 1
        if self.count[ptr] == 1:
            self.now += nbytes
            self.peak = max(self.peak, self.now)

    def remove(self, ptr: int, nbytes: int) -> None:
        self.count[ptr] -= 1
        if self.count[ptr] == 0:
            del self.count[ptr]
            self.now -= nbytes


class _Held:
    def __init__(self, meter: SavedTensorPeak, ptr: int, nbytes: int):
        self.meter, self.ptr, self.nbytes = meter, ptr, nbytes
        meter.add(ptr, nbytes)

    def __del__(self):
        self.meter.remove(self.ptr, self.nbytes)


def lever_ratios(name: str, factory, batch: Batch, rank: int, overrides: dict[str, str], repeats: int) -> dict:
    """Step time of `name` under bf16 autocast, torch.compile and both, over fp32 eager (the same process)."""

    def timed(method: Method, bf16: bool, seed: int) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            step(method, batch, seed)
        return time.perf_counter() - t0

    variants = {"fp32": (False, False), "bf16": (True, False), "compile": (False, True), "bf16+compile": (True, True)}
    methods, compile_s = {}, {}
    for label, (bf16, compiled) in variants.items():
        methods[label] = make_method(name, factory, batch, rank, overrides)
        if compiled:
            transformer = methods[label].backbone.pipe.transformer
            transformer.forward = torch.compile(transformer.forward, dynamic=False)
        compile_s[label] = timed(methods[label], bf16, 0) + timed(methods[label], bf16, 1)  # warm-up (+ compile)
    times = {label: min(timed(methods[label], variants[label][0], 10 + r) for r in range(repeats))
             for label in variants}
    return {"ms": {k: round(v * 1e3, 2) for k, v in times.items()},
            "ratio_to_fp32": {k: round(v / times["fp32"], 3) for k, v in times.items() if k != "fp32"},
            "first_two_steps_s": {k: round(v, 1) for k, v in compile_s.items()}}


def saved_peak(method: Method, fn) -> int:
    bb = method.backbone
    exclude = {t.untyped_storage().data_ptr() for t in list(bb.denoiser.parameters()) + list(bb.denoiser.buffers())}
    meter = SavedTensorPeak(exclude)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        fn()
    return meter.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", help="auto | tiny | glyphworld | random | a model dir")
    ap.add_argument("--width", type=int, default=64,
                    help="DiT width of --model random (glyphworld's architecture, random weights; glyphworld is 128)")
    ap.add_argument("--batch", type=int, default=int(DEFAULT_BUDGET["batch_size"]),
                    help="batch size for time and FLOPs (default: the default training budget's)")
    ap.add_argument("--mem-batch", type=int, default=16, help="batch size for the memory ratio")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dopsd config key=value")
    ap.add_argument("--compare", action="store_true", help="also time the other dopsd schedules (same process)")
    ap.add_argument("--levers", action="store_true", help="also time bf16 autocast and torch.compile (same process)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.overrides)

    if args.width != 64 and args.model != "random":
        ap.error(f"--width applies to --model random only, got --model {args.model}")
    if args.width < 32 or args.width % 32:
        ap.error(f"--width must be a multiple of 32 (attention heads of 32 channels), got {args.width}")
    model, factory = load(args.model, args.width)
    probe = factory()
    batch = make_batch(args.batch, probe.resolution)
    del probe
    sft = make_method("sft", factory, batch, args.rank, {})
    dopsd = make_method("dopsd", factory, batch, args.rank, overrides)
    print(f"model {model}, K={K}, batch {args.batch}, rank {args.rank}, {args.threads} threads, "
          f"dopsd config {dopsd.config}")
    methods = {"sft": sft, "dopsd": dopsd}
    if args.compare:
        for label, extra in (("sequential", {"schedule": "sequential"}),
                             ("batched/chunk2", {"schedule": "batched", "chunk": "2"}),
                             ("batched/all", {"schedule": "batched"})):
            methods[f"dopsd {label}"] = make_method("dopsd", factory, batch, args.rank, {**overrides, **extra})

    for method in methods.values():
        step(method, batch, 0)  # warm-up (caches, allocator)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.repeats):
        for name, method in methods.items():
            t0 = time.perf_counter()
            step(method, batch, r + 1)
            times[name].append(time.perf_counter() - t0)
    fl = {name: flops(method, batch) for name, method in methods.items()}
    for name in methods:
        print(f"{name:22s} step {min(times[name]) * 1e3:8.1f} ms min, {statistics.median(times[name]) * 1e3:8.1f} ms "
              f"median, {fl[name] / 1e9:7.3f} GFLOP;  time ratio {min(times[name]) / min(times['sft']):.2f}, "
              f"FLOP ratio {fl[name] / fl['sft']:.2f}")
    t_sft, t_dopsd = min(times["sft"]), min(times["dopsd"])
    f_sft, f_dopsd = fl["sft"], fl["dopsd"]

    mem_batch = make_batch(args.mem_batch, batch.images.shape[-1])

    def ours():
        step(dopsd, mem_batch, 0)

    def naive():
        for p in dopsd.trainable_parameters():
            p.grad = None
        dopsd.loss(mem_batch, torch.Generator().manual_seed(0)).backward()

    m_ours, m_naive = saved_peak(dopsd, ours), saved_peak(dopsd, naive)
    print(f"saved-activation peak at batch {args.mem_batch}: ours {m_ours / 2**20:.1f} MiB, "
          f"naive (K graphs alive) {m_naive / 2**20:.1f} MiB")
    result = {"time_ratio": round(t_dopsd / t_sft, 3), "flop_ratio": round(f_dopsd / f_sft, 3),
              "memory_ratio": round(m_ours / m_naive, 3), "time_per_flop_ratio": round(
                  (t_dopsd / t_sft) / (f_dopsd / f_sft), 3), "model": model, "k": K, "batch": args.batch,
              "mem_batch": args.mem_batch,
              "time_ratio_median": round(statistics.median(times["dopsd"]) / statistics.median(times["sft"]), 3),
              "schedule": dopsd.config.schedule, "chunk": dopsd.config.chunk,
              "sft_ms": round(t_sft * 1e3, 2), "dopsd_ms": round(t_dopsd * 1e3, 2),
              "sft_gflop": round(f_sft / 1e9, 4), "dopsd_gflop": round(f_dopsd / 1e9, 4)}
    if args.levers:
        result["levers"] = {name: lever_ratios(name, factory, batch, args.rank, overrides if name == "dopsd" else {},
                                               args.repeats) for name in ("sft", "dopsd")}
        for name, lever in result["levers"].items():
            print(f"{name:6s} over fp32 eager: {lever['ratio_to_fp32']}; first two steps (s): "
                  f"{lever['first_two_steps_s']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
