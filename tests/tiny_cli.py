"""The CLI on the fake backbone (tests/helpers_train.py) and a fast scorer, for tests that run it in a subprocess to
kill it or to limit the size of the files it may write.

    python tests/tiny_cli.py run --backbone fake --task tiny.yaml --method sft --steps 6 --out DIR
    python -m dopsd_bench.sweep sweep ... --backbone fake --runner tiny_cli:run_cell   # with tests/ on PYTHONPATH

Only the model, its features and the scorer are stand-ins: the CLI, the runner, the training loop, checkpoints,
resume, the sample cache and the run dir are the product's own. The scores are functions of the tuned model's
samples, so two runs whose training differs by one bit score differently.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from helpers_train import TINY_WORLD_TASK, FakeBackbone

TINY_TASK = TINY_WORLD_TASK


def sample_scores(backbone, data, method, features, cache_dir, timings, step_curve=(1, 2, 4, 8), progress=None,
                  batch_size=None) -> dict:
    """Per-sample mean and spread of the tuned model's samples at the native step count, as two metrics."""
    images = method.sample(data.eval_prompts, data.eval_seeds, backbone.native_steps).double()
    mean = images.mean(dim=(1, 2, 3)).tolist()
    spread = images.std(dim=(1, 2, 3)).tolist()
    timings.update({"sample_tuned": 0.0, "score": 0.0})
    return {"fidelity": {"mean": sum(mean) / len(mean), "per_sample": mean, "higher_is_better": True},
            "diversity": {"mean": sum(spread) / len(spread), "per_sample": spread, "higher_is_better": True}}


def install() -> None:
    """Put the fakes in place of the runner's model, features and scorer; register the backbone name `fake`."""
    from dopsd_bench import runner
    from dopsd_bench.registry import BACKBONES

    if "fake" not in BACKBONES:
        BACKBONES.add("fake", FakeBackbone, "the tests' fake backbone")
    runner._load_backbone = lambda cfg, device: FakeBackbone()
    runner._model_identity = lambda cfg: FakeBackbone().model_id
    runner._features = lambda *args: None
    runner._evaluate = sample_scores
    runner._preflight = lambda cfg, method: None  # plan's checks read a real backbone's configs


def run_cell(cfg):
    """A sweep's --runner: the product's run_cell on the fakes."""
    from dopsd_bench import runner

    install()
    return runner.run_cell(cfg)


if __name__ == "__main__":
    install()
    from dopsd_bench.cli import app

    app()
