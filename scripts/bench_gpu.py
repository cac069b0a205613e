"""D-OPSD and SFT training steps on a GPU, for both architectures at a mid-size config: step time, peak memory and
achieved FLOP/s.

    python scripts/bench_gpu.py                                   # cuda, bf16, mid size, batch 8 (~1 min on an H200)
    python scripts/bench_gpu.py --device cpu --size tiny --repeats 1 --threads 2          # smoke test (~1 min)
    python scripts/bench_gpu.py --device cpu --dtype bf16 --size tiny --repeats 1 --threads 2

Models are random-config pipelines of the real diffusers architectures (dopsd_bench/backbones/tiny.py), built in
process: `mid` has a 1536-wide DiT with 128-dim heads (flux2-klein: 2 double + 6 single blocks, 350M parameters;
z-image: 6 main blocks + 1 noise and 1 context refiner block, 240M) at 256x256 pixels, i.e. 1024 image tokens
(flux2's teacher adds 1024 reference tokens); text encoders, VAEs and z-image's VL teacher stay tiny. Each method
gets its own copy of the pipeline in `--dtype` with LoRA at the training rank, and runs `Method.loss_and_backward`
as the training loop calls it (scripts/bench_step.py's helpers; dopsd with K = 4 and its default config, `--set
key=value` to change it), at equal batch size: one warm-up step, then `--repeats` timed steps (synchronised on
cuda).
- ms: median step time; peak_mib: torch.cuda.max_memory_allocated during the timed steps over the memory allocated
  before them (weights, adapters, caches excluded; peak_total_mib includes them; null on the CPU); gflop: FLOPs of
  one step counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention); tflops: gflop /
  ms, achieved.
- ratios: D-OPSD over SFT, of step time and of FLOPs.
The last printed line is a JSON object with everything (`--out` also writes it). An architecture that fails is
recorded with its error and the other still runs; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import K, flops, make_batch, make_method, step

from dopsd_bench.train import DEFAULT_BUDGET

# keyword arguments of the tiny.py builders per size ("tiny" = their defaults: 32x32 pixels, 16 image tokens)
SIZES = {
    "tiny": {"flux2-klein": {}, "z-image": {}},
    "mid": {"flux2-klein": {"width": 1536, "head_dim": 128, "dit_layers": (2, 6), "resolution": 256},
            "z-image": {"dim": 1536, "n_heads": 12, "n_layers": 6, "n_refiner_layers": 1,
                        "axes_dims": (32, 48, 48), "resolution": 256}},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def factory(arch: str, size: str, device: torch.device, dtype: torch.dtype):
    """(make, resolution): `make()` gives a fresh backbone over a copy of one random pipeline on device in dtype."""
    from dopsd_bench.backbones import tiny
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
    from dopsd_bench.backbones.zimage import ZImageBackbone

    if arch == "flux2-klein":
        pipe, settings = tiny.tiny_flux2_klein_pipeline(0, **SIZES[size][arch])
        pipe.to(device=device, dtype=dtype)
        return lambda: Flux2KleinBackbone(copy.deepcopy(pipe), settings, size, device=device), settings["resolution"]
    if arch == "z-image":
        pipe, settings, teacher = tiny.tiny_z_image_pipeline(0, **SIZES[size][arch])
        pipe.to(device=device, dtype=dtype)  # the teacher follows the text encoder when the backbone attaches it

        def make():
            p, t = copy.deepcopy((pipe, teacher))
            return ZImageBackbone(p, settings, size, device=device, teacher=t)
        return make, settings["resolution"]
    raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(SIZES['mid'])}")


def measure(method, batch, repeats: int, cuda: bool) -> dict:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step(method, batch, 0)  # warm-up: kernels, allocator, text-embedding cache
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for r in range(repeats):
        sync()
        t0 = time.perf_counter()
        step(method, batch, r + 1)
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    ms = statistics.median(times) * 1e3
    params = sum(p.numel() for n, p in method.backbone.denoiser.named_parameters() if "lora_" not in n)
    out = {"ms": round(ms, 2), "ms_all": [round(t * 1e3, 2) for t in times],
           "peak_mib": None if peak is None else round(peak - before / 2**20, 1),
           "peak_total_mib": None if peak is None else round(peak, 1), "gflop": None, "tflops": None,
           "denoiser_mparams": round(params / 1e6, 1)}
    try:  # a counter failure must not lose the times (z-image's GQA shapes under torch 2.11: see dopsd_bench.cost)
        fl = flops(method, batch)
        out.update(gflop=round(fl / 1e9, 3), tflops=round(fl / ms / 1e9, 3))
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        out["flop_error"] = f"{type(e).__name__}: {e}"
    return out


def bench_arch(arch: str, args, device: torch.device, dtype: torch.dtype, overrides: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    make, resolution = factory(arch, args.size, device, dtype)
    batch = make_batch(args.batch, resolution)
    out: dict = {"resolution": resolution, "build_s": round(time.perf_counter() - t0, 1)}
    for name in ("sft", "dopsd"):
        method = make_method(name, make, batch, args.rank, overrides if name == "dopsd" else {})
        out[name] = measure(method, batch, args.repeats, device.type == "cuda")
        if name == "dopsd":
            out["dopsd_config"] = vars(method.config)
        del method
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gflops = (out["dopsd"]["gflop"], out["sft"]["gflop"])
    out["ratios"] = {"time": round(out["dopsd"]["ms"] / out["sft"]["ms"], 3),
                     "flops": None if None in gflops else round(gflops[0] / gflops[1], 3)}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--arch", action="append", choices=list(SIZES["mid"]), help="repeatable; default: both")
    ap.add_argument("--batch", type=int, default=int(DEFAULT_BUDGET["batch_size"]))
    ap.add_argument("--rank", type=int, default=int(DEFAULT_BUDGET["rank"]))
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dopsd config key=value")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cuda = device.type == "cuda"
    result = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": dtype_name, "size": args.size,
              "batch": args.batch, "rank": args.rank, "k": K, "repeats": args.repeats, "archs": {}}
    t0 = time.perf_counter()
    for arch in args.arch or list(SIZES["mid"]):
        try:
            r = result["archs"][arch] = bench_arch(arch, args, device, DTYPES[dtype_name],
                                                   dict(kv.split("=", 1) for kv in args.overrides))
            for name in ("sft", "dopsd"):
                m = r[name]
                peak = "-" if m["peak_mib"] is None else f"{m['peak_mib']:.0f} MiB"
                flop = "FLOPs not counted" if m["gflop"] is None else \
                    f"{m['gflop']:10.1f} GFLOP  {m['tflops']:8.2f} TFLOP/s"
                print(f"{arch:12s} {name:6s} {m['ms']:9.1f} ms  peak {peak:>10s}  {flop}")
            print(f"{arch:12s} dopsd/sft: time {r['ratios']['time']:.2f}x, FLOPs {r['ratios']['flops']}x "
                  f"({r['wall_s']:.0f} s incl. {r['build_s']:.0f} s build)", flush=True)
        except Exception as e:  # noqa: BLE001 -- record it and go on with the other architecture
            traceback.print_exc()
            result["archs"][arch] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()  # free a failed architecture's models before the next
        if cuda:
            torch.cuda.empty_cache()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 1 if any("error" in r for r in result["archs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
