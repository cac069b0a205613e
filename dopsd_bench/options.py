"""The command-line options that several commands share, declared once (typer `Annotated` aliases).

A command names its parameter and default; the flag's type and help text live here, so `run`, `eval` and `plan`
describe the same flag in the same words.
"""

from __future__ import annotations

from typing import Annotated

import typer

Method = Annotated[str, typer.Option(help="method name (see `dopsd-bench list methods`)")]
Task = Annotated[str, typer.Option(help="task name or path to a task .yaml")]
Instance = Annotated[str | None, typer.Option(help="task instance (default: the task's first)")]
Backbone = Annotated[str, typer.Option(help="backbone adapter (see `dopsd-bench list backbones`)")]
Model = Annotated[str | None, typer.Option(help="local path or hub id (default: the backbone's default)")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available)")]
Dtype = Annotated[str | None, typer.Option(help="frozen weights' dtype: bf16, fp16 or fp32 (default: bf16 on a GPU "
                                                "that has it, else fp32); LoRA weights stay fp32")]
EvalBatchSize = Annotated[int | None, typer.Option(help="images sampled at once when scoring (default: 16 on a GPU, "
                                                        "all at once on the CPU)")]
Out = Annotated[str, typer.Option("--out", help="results root; the run dir is OUT/<cell id>")]
BatchSize = Annotated[int | None, typer.Option(help="training batch size (default: the method's)")]
Rank = Annotated[int | None, typer.Option(help="LoRA rank (default: the method's)")]
GradientCheckpointing = Annotated[bool, typer.Option(help="recompute the denoiser's activations in backward: less "
                                                          "memory, slower steps")]
Scorer = Annotated[str | None, typer.Option(help="judge (the world judge's features) or dino-clip (DINOv2 + CLIP); "
                                                  "default: the judge for world tasks and on a backbone at the "
                                                  "judge's 32 px, else dino-clip")]
Dino = Annotated[str | None, typer.Option(help="DINOv2 weights for --scorer dino-clip: a local folder or cached hub "
                                              "id (default: $DOPSD_BENCH_DINO, else facebook/dinov2-small)")]
Clip = Annotated[str | None, typer.Option(help="CLIP weights for --scorer dino-clip, or 'none' to score without CLIP "
                                              "(default: $DOPSD_BENCH_CLIP, else openai/clip-vit-base-patch32)")]
ExtraFd = Annotated[str | None, typer.Option(help="further feature spaces for the retention FD/KID, comma-separated "
                                                  "(effnet_lite0: ImageNet features, docs/metrics.md; default: "
                                                  "$DOPSD_BENCH_EXTRA_FD, else none)")]
TeacherModel = Annotated[str | None, typer.Option(help="the in-context teacher's vision-language model for z-image "
                                                        "(a local folder or hub id; default: the model folder's "
                                                        "dopsd_bench.json, else Qwen/Qwen3-VL-4B-Instruct)")]
