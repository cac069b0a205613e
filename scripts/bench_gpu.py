"""D-OPSD and SFT training steps on a GPU, for both architectures at a mid-size config: step time, peak memory
against `dopsd-bench plan`'s estimate, and achieved FLOP/s.

    python scripts/bench_gpu.py                      # cuda, bf16, mid size, batch 8, checkpointing off and on
    python scripts/bench_gpu.py --device cpu --size tiny --repeats 1 --threads 2          # smoke test (~1 min)
    python scripts/bench_gpu.py --device cpu --size small --repeats 1 --gradient-checkpointing off,on

Models are random-config pipelines of the real diffusers architectures (dopsd_bench/backbones/tiny.py), built in
process: `mid` has a 1536-wide DiT with 128-dim heads (flux2-klein: 2 double + 6 single blocks, 350M parameters;
z-image: 6 main blocks + 1 noise and 1 context refiner block, 240M) at 256x256 pixels, i.e. 1024 image tokens
(flux2's teacher adds 1024 reference tokens); `small` is 256 wide at 96 px (minutes on one CPU thread);
text encoders, VAEs and z-image's VL teacher stay tiny. Each row (architecture, method, gradient checkpointing) gets
its own copy of the pipeline in `--dtype` with LoRA at the training rank and runs training steps as the training
loop does (dopsd_bench/train.py): `Method.loss_and_backward` under autocast to the dtype (none for fp32), then an
AdamW step (dopsd with K = 4 and its default config, `--set key=value` to change it), at equal batch size: one
warm-up step, one step whose memory is measured, then `--repeats` timed steps (synchronised on cuda).
- ms: median step time; gflop: FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode (matmuls,
  convolutions, attention); tflops: gflop / ms, achieved.
- measured_mib: the peak of one training step (the one after the warm-up, so AdamW's moments exist) in bytes of live
  tensors above those allocated before the row's pipeline copy was built: the weights of every component, the LoRA
  adapters, their gradients and AdamW state, what autograd saves, and the step's transients (activation gradients in
  backward, no-grad forwards such as the roll-out, the teacher and the VAE). This is what the plan's estimate claims
  to cover (weights + trainable state + saved activations), which leaves the transients as the expected gap. On cuda
  it is torch.cuda.max_memory_allocated; on the CPU, torch.profiler's allocation events (profile_memory=True),
  summed in time order: both count tensor bytes handed out by torch's allocator, so neither includes allocator slack
  (cached or fragmented blocks), library workspaces (cuBLAS, oneDNN scratchpads), CUDA context or Python objects.
  The profiler was chosen over the process's peak RSS (VmHWM) because RSS includes exactly those, and glibc keeps
  freed heap pages resident, so a peak RSS measures the allocator as much as the step; `cpu_peak_bytes` is checked
  against tensors of known size in tests/test_scripts.py. peak_total_mib (cuda) is the absolute allocator peak.
- estimate_mib: `dopsd-bench plan`'s peak for the same model (the pipeline's configs, written to a temporary folder
  and read by dopsd_bench.plan.make_plan), method, batch, rank, dtype, resolution and checkpointing; estimate_ratio =
  estimate / measured; estimate_parts_mib: its weights, trainable state, saved activations and the teacher pass's peak.
- ratios: D-OPSD over SFT, of step time and of FLOPs, per checkpointing setting.
The last printed line is a JSON object with everything (`--out` also writes it). An architecture that fails is
recorded with its error and the other still runs; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import K, flops, make_batch, make_method

from dopsd_bench.train import DEFAULT_BUDGET, MixedPrecision

# keyword arguments of the tiny.py builders per size ("tiny" = their defaults: 32x32 pixels, 16 image tokens)
SIZES = {
    "tiny": {"flux2-klein": {}, "z-image": {}},
    "small": {"flux2-klein": {"width": 256, "head_dim": 64, "dit_layers": (1, 2), "resolution": 96},
              "z-image": {"dim": 256, "n_heads": 4, "n_layers": 2, "n_refiner_layers": 1,
                          "axes_dims": (16, 24, 24), "resolution": 96}},
    "mid": {"flux2-klein": {"width": 1536, "head_dim": 128, "dit_layers": (2, 6), "resolution": 256},
            "z-image": {"dim": 1536, "n_heads": 12, "n_layers": 6, "n_refiner_layers": 1,
                        "axes_dims": (32, 48, 48), "resolution": 256}},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MiB = 2**20


def save_configs(pipe, settings: dict, folder: Path, teacher=None) -> None:
    """`pipe`'s configs without its weights, laid out as a model folder that `dopsd-bench plan` reads: model_index.json,
    each component's config, the tokenizer, the adapter's sidecar and (z-image) the VL teacher's config."""
    from diffusers.configuration_utils import ConfigMixin

    pipe.save_config(folder)
    for name, module in pipe.components.items():
        if isinstance(module, ConfigMixin):  # diffusers models and the scheduler
            module.save_config(folder / name)
        elif hasattr(module, "config") and hasattr(module.config, "save_pretrained"):  # transformers models
            module.config.save_pretrained(folder / name)
        elif name == "tokenizer":  # the plan sizes the task's captions with it
            module.save_pretrained(folder / name)
    if teacher is not None:
        teacher.model.config.save_pretrained(folder / settings["vl_model"])
    (folder / "dopsd_bench.json").write_text(json.dumps(settings))


def factory(arch: str, size: str, device: torch.device, dtype: torch.dtype, config_dir: Path | None = None):
    """(make, resolution): `make()` gives a fresh backbone over a copy of one random pipeline on device in dtype; with
    `config_dir`, that pipeline's configs are written there for the plan (save_configs)."""
    from dopsd_bench.backbones import tiny
    from dopsd_bench.backbones.flux2 import Flux2KleinBackbone
    from dopsd_bench.backbones.zimage import ZImageBackbone

    if arch == "flux2-klein":
        pipe, settings = tiny.tiny_flux2_klein_pipeline(0, **SIZES[size][arch])
        if config_dir is not None:
            save_configs(pipe, settings, config_dir)
        pipe.to(device=device, dtype=dtype)
        return lambda: Flux2KleinBackbone(copy.deepcopy(pipe), settings, size, device=device), settings["resolution"]
    if arch == "z-image":
        pipe, settings, teacher = tiny.tiny_z_image_pipeline(0, **SIZES[size][arch])
        if config_dir is not None:
            save_configs(pipe, settings, config_dir, teacher)
        pipe.to(device=device, dtype=dtype)  # the teacher follows the text encoder when the backbone attaches it

        def make():
            p, t = copy.deepcopy((pipe, teacher))
            return ZImageBackbone(p, settings, size, device=device, teacher=t)
        return make, settings["resolution"]
    raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(SIZES['mid'])}")


# ---- peak memory ---------------------------------------------------------------------------------------------
def cpu_peak_bytes(prof, window: str) -> int:
    """The peak of live CPU tensor bytes during the `record_function(window)` range of profile `prof` (run with
    profile_memory=True), above the bytes live when profiling started: allocation events summed in time order."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    marks = [n for n in nodes if n.tag == _EventType.TorchOp and n.name == window]
    if len(marks) != 1:
        raise RuntimeError(f"expected one {window!r} range in the profile, found {len(marks)}")
    start, end = marks[0].start_time_ns, marks[0].end_time_ns
    events = sorted((n.start_time_ns, n.extra_fields.alloc_size) for n in nodes if n.tag == _EventType.Allocation
                    and n.extra_fields.device.type == "cpu")
    live, peak = 0, None
    for t, size in events:
        if t > end:
            break
        if t >= start and peak is None:
            peak = live  # the level on entering the window
        live += size
        if t >= start:
            peak = max(peak, live)
    return live if peak is None else peak


class PeakMemory:
    """Bytes of live tensors at the peak of the `window()` block, above those live when the meter was entered: cuda's
    allocator statistics, or torch.profiler's allocation events on the CPU (see the module docstring)."""

    WINDOW = "bench_gpu.measured_step"

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_bytes = self.total_bytes = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    @contextlib.contextmanager
    def window(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.total_bytes = torch.cuda.max_memory_allocated()
            self.peak_bytes = self.total_bytes - self.before
        else:
            with torch.autograd.profiler.record_function(self.WINDOW):
                yield

    def __exit__(self, *exc):
        if not self.cuda:
            self.prof.__exit__(*exc)
            if exc[0] is None:
                self.peak_bytes = cpu_peak_bytes(self.prof, self.WINDOW)
            del self.prof
        return False


# ---- one row -------------------------------------------------------------------------------------------------
class TrainStep:
    """One optimiser step as dopsd_bench.train runs it: gradients cleared, the method's loss and backward under
    autocast to the weights' dtype (backward outside it), AdamW on the trainable parameters, the method's after_step."""

    def __init__(self, method, dtype_name: str, device: torch.device):
        self.method = method
        self.amp = MixedPrecision(dtype_name, device)
        self.optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4)
        self.done = 0

    def __call__(self, batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp.autocast():
            self.method.loss_and_backward(batch, torch.Generator().manual_seed(self.done),
                                          self.amp.backward(torch.Tensor.backward))
        self.amp.step(self.optimizer)
        self.done += 1
        self.method.after_step(self.done)


def plan_estimate(arch: str, config_dir: Path, name: str, args, dtype_name: str, device: torch.device,
                  overrides: dict[str, str], checkpointing: bool):
    """`dopsd-bench plan`'s Plan for this row's model, method, batch, rank, dtype and checkpointing."""
    from dopsd_bench.plan import make_plan

    settings = {**overrides, "k": str(K)} if name == "dopsd" else {}
    return make_plan(arch, str(config_dir), name, "style", dtype=dtype_name, device=device.type,
                     batch_size=args.batch, rank=args.rank, overrides=settings,
                     gradient_checkpointing=checkpointing)


def measure(name: str, make, batch, args, dtype_name: str, device: torch.device, overrides: dict[str, str],
            checkpointing: bool) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def fresh():
        backbone = make()
        if checkpointing:
            backbone.enable_gradient_checkpointing()
        return backbone

    with PeakMemory(device) as memory:  # from before the pipeline copy: weights, adapters, optimiser state, the step
        method = make_method(name, fresh, batch, args.rank, overrides)
        train_step = TrainStep(method, dtype_name, device)
        train_step(batch)  # warm-up: kernels, allocator, text-embedding cache, AdamW's moments
        with memory.window():
            train_step(batch)
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        train_step(batch)
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    params = sum(p.numel() for n, p in method.backbone.denoiser.named_parameters() if "lora_" not in n)
    out = {"ms": round(ms, 2), "ms_all": [round(t * 1e3, 2) for t in times],
           "measured_mib": round(memory.peak_bytes / MiB, 1),
           "peak_total_mib": None if memory.total_bytes is None else round(memory.total_bytes / MiB, 1),
           "gflop": None, "tflops": None, "denoiser_mparams": round(params / 1e6, 1)}
    if name == "dopsd":
        out["dopsd_config"] = vars(method.config)
    try:  # a counter failure must not lose the times (z-image's GQA shapes under torch 2.11: see dopsd_bench.cost)
        fl = flops(method, batch)
        out.update(gflop=round(fl / 1e9, 3), tflops=round(fl / ms / 1e9, 3))
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        out["flop_error"] = f"{type(e).__name__}: {e}"
    return out


def bench_arch(arch: str, args, device: torch.device, dtype_name: str, overrides: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as config_dir:
        make, resolution = factory(arch, args.size, device, DTYPES[dtype_name], Path(config_dir))
        batch = make_batch(args.batch, resolution)
        out: dict = {"resolution": resolution, "build_s": round(time.perf_counter() - t0, 1), "checkpointing": {}}
        for setting in args.gradient_checkpointing:
            rows = out["checkpointing"][setting] = {}
            for name in ("sft", "dopsd"):
                row = measure(name, make, batch, args, dtype_name, device, overrides if name == "dopsd" else {},
                              setting == "on")
                plan = plan_estimate(arch, Path(config_dir), name, args, dtype_name, device, overrides,
                                     setting == "on")
                row["estimate_mib"] = round(plan.peak_bytes / MiB, 1)
                row["estimate_ratio"] = round(plan.peak_bytes / MiB / row["measured_mib"], 3)
                row["estimate_parts_mib"] = {"weights": round(plan.weight_bytes / MiB, 1),
                                             "trainable": round(plan.trainable_bytes / MiB, 1),
                                             "activations": round(plan.activation_bytes / MiB, 1),
                                             "teacher_pass": round((plan.teacher_bytes or 0) / MiB, 1)}
                rows[name] = row
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            gflops = (rows["dopsd"]["gflop"], rows["sft"]["gflop"])
            rows["ratios"] = {"time": round(rows["dopsd"]["ms"] / rows["sft"]["ms"], 3),
                              "flops": None if None in gflops else round(gflops[0] / gflops[1], 3)}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def checkpointing_settings(text: str) -> list[str]:
    settings = [s.strip() for s in text.split(",")]
    if not settings or any(s not in ("off", "on") for s in settings) or len(set(settings)) != len(settings):
        raise argparse.ArgumentTypeError(f"expected off, on or off,on; got {text!r}")
    return settings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--size", choices=list(SIZES), default="mid")
    ap.add_argument("--arch", action="append", choices=list(SIZES["mid"]), help="repeatable; default: both")
    ap.add_argument("--batch", type=int, default=int(DEFAULT_BUDGET["batch_size"]))
    ap.add_argument("--rank", type=int, default=int(DEFAULT_BUDGET["rank"]))
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    ap.add_argument("--gradient-checkpointing", type=checkpointing_settings,
                    help="off, on or off,on: rows without and with it (default: off,on on cuda, off on cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dopsd config key=value")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.gradient_checkpointing = args.gradient_checkpointing or (["off", "on"] if cuda else ["off"])
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    result = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": dtype_name, "size": args.size,
              "batch": args.batch, "rank": args.rank, "k": K, "repeats": args.repeats,
              "gradient_checkpointing": args.gradient_checkpointing, "archs": {}}
    t0 = time.perf_counter()
    for arch in args.arch or list(SIZES["mid"]):
        try:
            r = result["archs"][arch] = bench_arch(arch, args, device, dtype_name,
                                                   dict(kv.split("=", 1) for kv in args.overrides))
            for setting, rows in r["checkpointing"].items():
                for name in ("sft", "dopsd"):
                    m = rows[name]
                    flop = "FLOPs not counted" if m["gflop"] is None else \
                        f"{m['gflop']:9.1f} GFLOP {m['tflops']:7.2f} TFLOP/s"
                    print(f"{arch:12s} {name:6s} ckpt {setting:3s} {m['ms']:9.1f} ms  peak {m['measured_mib']:8.1f} "
                          f"MiB, plan {m['estimate_mib']:8.1f} MiB ({m['estimate_ratio']:.2f}x)  {flop}")
                print(f"{arch:12s} dopsd/sft ckpt {setting}: time {rows['ratios']['time']:.2f}x, "
                      f"FLOPs {rows['ratios']['flops']}x", flush=True)
            print(f"{arch:12s} {r['wall_s']:.0f} s incl. {r['build_s']:.0f} s build", flush=True)
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
