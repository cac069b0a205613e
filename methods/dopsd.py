"""`dopsd`: on-policy self-distillation (arXiv 2605.05204), as the paper's released code does it.

References are to wangshankun/D-OPSD, flux2-klein_self-distill-edit/ (the z-image-turbo folder is the same loop):
- two LoRA adapters on one denoiser, "student" (trained) and "teacher" (frozen, initialised as a copy of the
  student): ema_utils.py `init_dual_lora_transformer(..., old_init_from_current=True)`;
- the teacher is an EMA of the student, updated after every optimiser step with decay 0.9999:
  `ema_update_lora_adapter` (ema_utils.py) called in train_dopsd.py, `--ema-decay 0.9999` in scripts/train_lora_*.sh;
- one fresh Gaussian noise per sample and step (`pipeline.prepare_latents(generator=None)`), no re-noising: the
  student rolls out K Euler steps at the pipeline's own schedule for K = `--num-training-steps 4` (the native step
  count), x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v_student(x_k). Here the roll-out takes the student's own
  sampling steps (`Backbone.step`): those Euler steps for the models the paper tunes, whose schedulers are Euler;
  a student whose scheduler samples stochastically rolls out as it samples;
- every state is detached (`latents_student.detach()`, "avoid cross-timestep BPTT"); at each state the teacher
  predicts with text + target-image reference tokens under no_grad after `set_adapter("teacher")`, the student
  with text after `set_adapter("student")`;
- loss = F.mse_loss(x0_student, x0_teacher) per state, x0 = x - sigma v, summed over the K states / K, one backward.

Defaults and why:
- `teacher="ema"`, `ema_decay=0.9999` as released. At 0.9999 the teacher holds 1 - 0.9999^N of the student after N
  steps (`losses.ema_source_weight`): 2% at 200 steps, 26% at the released 3001 steps. At this suite's short budgets
  the teacher is therefore ~the initial (untuned, since LoRA B starts at zero) in-context model, i.e. close to
  `teacher="frozen"`; we keep the released value rather than retune it, and `--set ema_decay=...` changes it.
- `target="x0"` as released; `target="velocity"` is the paper's equation (= x0 loss with per-state weight 1/sigma^2).
- The step is computed without keeping K graphs alive (`loss_and_backward`): `schedule="sequential"` runs, per
  state, the student forward + teacher forward + backward of that state's share of the loss, then steps the
  roll-out with the detached student velocity (the same FLOPs as the released loop, ~1/K of its activation memory);
  `schedule="batched"` first rolls out the K states without grad (K - 1 extra student forwards), then runs one
  teacher forward on all K states and the student forward/backward on `chunk` states at a time. Both give the
  released loop's gradients (tests/test_methods.py checks it against `loss`, which is that plain loop).
- Default `schedule="batched", chunk=2`: on the embedded-size CPU model per-call overhead dominates, so fewer and
  larger calls win (scripts/bench_step.py --compare, tiny Flux2, batch 8, K = 4, 2 threads: step time over SFT's
  4.2-4.8x batched/chunk 2 vs 5.3x sequential, for FLOP ratios 2.97 vs 2.56), and chunk 2 of K = 4 halves the
  activation peak (memory_ratio 0.5). For large models on a GPU, where batch 1 already fills the device,
  `schedule=sequential` saves the K - 1 roll-out forwards (memory_ratio 1/K).
- In a sequence (continual tuning, docs/continual.md) with carry=continue, the teacher follows its own rule across
  rounds: `ema` keeps averaging the student from where the last round left it; `frozen` is the model at the start
  of each round; `self` is the student. With carry=merge every round starts a fresh student and teacher on the
  merged model, so each teacher starts as that round's starting model.
- `state_subset=m` trains on m of the K states drawn at random per step (an unbiased estimate of the mean over K;
  a cheaper variant, not the paper's algorithm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from dopsd_bench import flow
from dopsd_bench.backbones.base import Backbone, Cond, repeat_cond
from dopsd_bench.errors import ConfigError
from dopsd_bench.losses import ema_update, velocity_distillation_loss, x0_distillation_loss
from dopsd_bench.method import Batch, Method, MethodConfig, has_adapter
from dopsd_bench.registry import METHODS


@dataclass
class DOPSDConfig(MethodConfig):
    teacher: Literal["ema", "frozen", "self"] = "ema"  # frozen: the initial copy; self: the current student
    ema_decay: float = 0.9999  # released scripts' --ema-decay; only for teacher="ema"
    target: Literal["x0", "velocity"] = "x0"  # x0: released code; velocity: the paper's equation
    k: int | None = None  # roll-out steps; None = the backbone's native step count
    state_subset: int | None = None  # train on this many of the K states per step (None = all K, faithful)
    schedule: Literal["sequential", "batched"] = "batched"  # how the step's gradients are computed (see above)
    chunk: int | None = 2  # batched only: states per student forward/backward (None = all K at once)

    def __post_init__(self) -> None:
        if self.teacher not in ("ema", "frozen", "self"):
            raise ValueError(f"teacher={self.teacher!r}; allowed: ema, frozen, self")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.target not in ("x0", "velocity"):
            raise ValueError(f"target={self.target!r}; allowed: x0, velocity")
        if self.schedule not in ("sequential", "batched"):
            raise ValueError(f"schedule={self.schedule!r}; allowed: sequential, batched")
        for key in ("k", "state_subset", "chunk"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 (or none), got {value}")
        if self.k is not None and self.state_subset is not None and self.state_subset > self.k:
            raise ValueError(f"state_subset={self.state_subset} exceeds k={self.k}")


@dataclass
class _Step:
    """What one training step needs: conditionings, schedule, starting noise and the states that train."""

    cond_s: Cond
    cond_t: Cond
    sigmas: torch.Tensor  # (K + 1,) from 1 to 0
    x: torch.Tensor  # (B, C, h, w) initial noise
    x0: torch.Tensor | None  # clean latents (offpolicy only)
    eps: torch.Tensor | None  # (K, B, C, h, w) noise per state (offpolicy only)
    selected: list[int]  # indices of the states that enter the loss, increasing
    seeds: list[int] | None  # the fresh noise of a student that samples stochastically (Backbone.step); else None


@METHODS.register("dopsd", description="on-policy self-distillation: student roll-out, in-context EMA teacher")
class DOPSD(Method):
    name = "dopsd"
    description = "on-policy self-distillation: student roll-out, in-context EMA teacher"
    Config = DOPSDConfig
    teacher_adapter: ClassVar[str] = "teacher"
    needs_data_latents: ClassVar[bool] = False

    # ---- adapters ------------------------------------------------------------------------------------
    def setup(self, backbone: Backbone, train: Batch, rank: int, generator: torch.Generator) -> None:
        k = self.config.k or backbone.native_steps
        if self.config.state_subset is not None and self.config.state_subset > k:
            raise ConfigError(f"state_subset={self.config.state_subset} exceeds the roll-out's K = {k} states "
                              f"({'k' if self.config.k else 'the model native steps'}); give at most {k}")
        super().setup(backbone, train, rank, generator)
        self.student_params = backbone.lora_parameters(self.adapter)
        self.teacher_params: list[torch.nn.Parameter] = []
        if self.config.teacher != "self":
            # a sequence's later round (continual.py, carry=continue) finds the teacher of the round before: the EMA
            # keeps going from it; `frozen` is re-copied from the student, i.e. the model at the start of the round
            carried = has_adapter(backbone, self.teacher_adapter)
            if not carried:
                backbone.add_lora(self.teacher_adapter, rank=rank)
            named = dict(backbone.denoiser.named_parameters())
            student_names = [n for n, p in named.items() if f".{self.adapter}." in n and "lora_" in n]
            self.student_params = [named[n] for n in student_names]
            self.teacher_params = [named[n.replace(f".{self.adapter}.", f".{self.teacher_adapter}.")]
                                   for n in student_names]
            if not carried or self.config.teacher == "frozen":
                ema_update(self.teacher_params, self.student_params, 0.0)  # teacher = copy of the initial student
        self._use_student()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.student_params)

    def _use_student(self) -> None:
        # peft's set_adapter makes the active adapter trainable and the others frozen: restore our rule
        self.backbone.set_adapter(self.adapter)
        for p in self.student_params:
            p.requires_grad_(True)
        for p in self.teacher_params:
            p.requires_grad_(False)

    @torch.no_grad()
    def _teacher_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond_t: Cond, fold: bool = False
                          ) -> torch.Tensor:
        """The teacher's prediction (with the reference context). `fold`: its adapter folded into the weights
        (`_folded`), only while no autograd graph of the step is alive."""
        if self.config.teacher == "self" and not fold:
            return self.backbone.predict_velocity(x, sigma, cond_t)
        adapter = self.adapter if self.config.teacher == "self" else self.teacher_adapter
        with self._folded(adapter, fold):
            return self.backbone.predict_velocity(x, sigma, cond_t)

    @contextlib.contextmanager
    def _folded(self, adapter: str, fold: bool = True) -> Iterator[None]:
        """A no-grad pass with `adapter`: folded into the base weights where the backbone can and `fold` (fewer,
        larger calls; only while no graph of the step is alive), else switched to; the student is active after."""
        merged = getattr(self.backbone, "merged_adapter", None) if fold else None
        try:
            if merged is None:
                self.backbone.set_adapter(adapter)
                yield
            else:
                with merged(adapter):
                    yield
        finally:
            self._use_student()

    def after_step(self, step: int) -> None:
        if self.config.teacher == "ema":
            ema_update(self.teacher_params, self.student_params, self.config.ema_decay)

    # ---- the objective ---------------------------------------------------------------------------------
    def _objective(self, x: torch.Tensor, sigma: torch.Tensor, v_student: torch.Tensor,
                   v_teacher: torch.Tensor) -> torch.Tensor:
        """Distillation loss at states x (n, ...) with sigma (n,): mean over states of the per-state loss."""
        if self.config.target == "velocity":
            return velocity_distillation_loss(v_student, v_teacher)
        return x0_distillation_loss(flow.x0_from_velocity(x, v_student, sigma),
                                    flow.x0_from_velocity(x, v_teacher, sigma))

    def _prepare(self, batch: Batch, generator: torch.Generator) -> _Step:
        bb = self.backbone
        self._use_student()
        k = self.config.k or bb.native_steps
        sigmas = bb.sigmas(k).to(bb.device)
        b = batch.images.shape[0]
        x = torch.randn((b, *bb.latent_shape()), generator=generator).to(bb.device)
        x0 = eps = None
        if self.needs_data_latents:
            x0 = bb.encode_images(batch.images)
            eps = torch.randn((k, b, *bb.latent_shape()), generator=generator).to(bb.device)
        selected = list(range(k))
        if self.config.state_subset is not None and self.config.state_subset < k:
            selected = sorted(torch.randperm(k, generator=generator)[: self.config.state_subset].tolist())
        # drawn last and only then, so that an Euler student's random stream is what it always was
        seeds = torch.randint(2**31 - 1, (b,), generator=generator).tolist() if bb.stochastic_sampling else None
        return _Step(bb.encode_prompts(batch.captions), bb.encode_teacher(batch.captions, batch.images),
                     sigmas, x, x0, eps, selected, seeds)

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The released loop, literally: K states, every graph kept until one backward of the mean."""
        st = self._prepare(batch, generator)
        x, total = st.x, 0.0
        for k in range(st.selected[-1] + 1):
            sigma = st.sigmas[k].expand(x.shape[0])
            if k in st.selected:
                v_t = self._teacher_velocity(x, sigma, st.cond_t)
                v_s = self.backbone.predict_velocity(x, sigma, st.cond_s)
                total = total + self._objective(x, sigma, v_s, v_t)
            else:
                with torch.no_grad():
                    v_s = self.backbone.predict_velocity(x, sigma, st.cond_s)
            x = self.backbone.step(x, v_s.detach(), st.sigmas[k], st.sigmas[k + 1], st.seeds).detach()
        return total / len(st.selected)

    def graph_rows(self, batch_size: int, native_steps: int) -> int:
        """Sequential: one state's forward at a time; batched: `chunk` of the trained states per forward."""
        states = self.config.state_subset or self.config.k or native_steps
        if self.config.schedule == "sequential":
            return batch_size
        return batch_size * min(self.config.chunk or states, states)

    def teacher_rows(self, batch_size: int, native_steps: int) -> int:
        """Sequential: the teacher sees one state's batch; batched: all trained states at once (`_batched`)."""
        states = self.config.state_subset or self.config.k or native_steps
        return batch_size if self.config.schedule == "sequential" else batch_size * states

    def teacher_pass_folded(self) -> bool:
        return self.config.schedule == "batched"  # `_batched` folds; `_sequential` switches adapters

    def loss_and_backward(self, batch: Batch, generator: torch.Generator,
                          backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        backward = backward or torch.Tensor.backward
        st = self._prepare(batch, generator)
        if self.config.schedule == "sequential":
            return self._sequential(st, backward)
        return self._batched(st, self._rollout(st), backward, self.config.chunk)

    def _sequential(self, st: _Step, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Per state: student forward, teacher forward, backward of loss_k / n; then the next state."""
        x, n, total = st.x, len(st.selected), torch.zeros((), device=st.x.device)
        for k in range(st.selected[-1] + 1):
            sigma = st.sigmas[k].expand(x.shape[0])
            if k in st.selected:
                v_t = self._teacher_velocity(x, sigma, st.cond_t)
                v_s = self.backbone.predict_velocity(x, sigma, st.cond_s)
                part = self._objective(x, sigma, v_s, v_t) / n
                backward(part)  # frees this state's graph before the next state's forward
                total += part.detach()
            else:
                with torch.no_grad():
                    v_s = self.backbone.predict_velocity(x, sigma, st.cond_s)
            x = self.backbone.step(x, v_s.detach(), st.sigmas[k], st.sigmas[k + 1], st.seeds).detach()
        return total

    @torch.no_grad()
    def _rollout(self, st: _Step) -> list[torch.Tensor]:
        """The student's states x_0 .. x_last (no grad): the last selected state needs no forward of its own."""
        states, x = [st.x], st.x
        with self._folded(self.adapter):
            for k in range(st.selected[-1]):
                v = self.backbone.predict_velocity(x, st.sigmas[k].expand(x.shape[0]), st.cond_s)
                x = self.backbone.step(x, v, st.sigmas[k], st.sigmas[k + 1], st.seeds)
                states.append(x)
        return states

    def _batched(self, st: _Step, states: list[torch.Tensor], backward, chunk: int | None) -> torch.Tensor:
        """One teacher forward on all selected states, student forward/backward `chunk` states at a time."""
        b, n = st.x.shape[0], len(st.selected)
        xs = torch.cat([states[k] for k in st.selected])
        sig = torch.cat([st.sigmas[k].expand(b) for k in st.selected])
        v_t = self._teacher_velocity(xs, sig, repeat_cond(st.cond_t, n), fold=True)  # no graph is alive yet
        chunk = chunk or n
        total = torch.zeros((), device=xs.device) if backward is not None else 0.0
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            rows = slice(start * b, (start + m) * b)
            v_s = self.backbone.predict_velocity(xs[rows], sig[rows], repeat_cond(st.cond_s, m))
            part = self._objective(xs[rows], sig[rows], v_s, v_t[rows]) * (m / n)
            if backward is None:
                total = total + part
            else:
                backward(part)
                total += part.detach()
        return total
