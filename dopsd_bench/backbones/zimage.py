"""`z-image`: the adapter over diffusers' ZImagePipeline (Z-Image-Turbo).

Conventions hidden here (read off ZImagePipeline.__call__):
- the transformer takes t = 1 - sigma (the pipeline passes (1000 - timestep) / 1000) and a list of (C, 1, h, w)
  latents, and predicts -(eps - x0): the pipeline negates its output before the Euler step;
- latents are normalised as (z - shift_factor) * scaling_factor of the AutoencoderKL;
- prompts go through the Qwen3 chat template, the text encoder's hidden_states[-2], and are cut to their real
  length (a list of variable-length embeddings). Here a Cond holds them padded to a fixed length plus a mask, so
  conds can be sliced, repeated and concatenated; the padding is dropped again before the transformer.

Teacher context, as the paper's released code does it (z-image-turbo_self-distill-vlm/vlm_utils.py): a Qwen3-VL
model whose language-model weights are those of Z-Image's Qwen3 text encoder reads the chat-templated image +
prompt, and the DiT gets its hidden_states[-2]. The image reaches the DiT only through these tokens. The VL model
comes from `vl_model` (a path or hub id; default Qwen/Qwen3-VL-4B-Instruct, as the paper) and is loaded on the
first teacher call; its processing (chat template, Qwen2-VL image patches, one <|image_pad|> per merged patch) is
done here with the tokenizer and the PIL image processor, because transformers' Qwen3VLProcessor also needs
torchvision for its video half.

Or (`"teacher": "omni"` in the sidecar) the DiT's own in-context path, as ZImageOmniPipeline calls it: the
reference's latents are a clean condition image beside the noisy one (the transformer's omni mode, timestep 1 for
clean tokens, the image at its own RoPE slot with the same h/w grid) and the prompt is split into the pipeline's
three caption segments around the two images. No VL model is read. A DiT that also reads SigLIP features of its
condition images (Z-Image-Omni's `siglip_feat_dim`) is refused: this teacher passes latents only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dopsd_bench.backbones.base import Backbone, Cond, model_identity, module_dtype
from dopsd_bench.backbones.lora import DiffusersLora
from dopsd_bench.errors import UserError
from dopsd_bench.registry import BACKBONES

# Z-Image-Turbo's own settings, used when a model dir has no dopsd_bench.json sidecar. The model card samples with
# num_inference_steps=9 and guidance_scale=0; the teacher settings are those of the paper's training script.
Z_IMAGE_SETTINGS = {"native_steps": 9, "resolution": 1024, "max_sequence_length": 512, "teacher_max_length": 1024,
                    "vl_model": "Qwen/Qwen3-VL-4B-Instruct", "vl_min_pixels": 512 * 512, "vl_max_pixels": 768 * 768}
# the paper's LoRA targets (attention and SwiGLU projections of every block, refiners included)
LORA_TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
SIDECAR = "dopsd_bench.json"
TEACHERS = ("vl", "omni")
# ZImageOmniPipeline's caption segments for one condition image: before it, between it and the target, after it
OMNI_SEGMENTS = ("<|im_start|>user\n<|vision_start|>",
                 "<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
                 "<|vision_end|><|im_end|>")


def resolve_model(model: str) -> tuple[str, dict]:
    """A local dir or hub id -> (path or id, adapter settings); a local dir may carry a dopsd_bench.json sidecar."""
    settings = dict(Z_IMAGE_SETTINGS)
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(f"{model} is not a diffusers pipeline folder: expected {path}/model_index.json")
        if (path / SIDECAR).exists():
            settings.update(json.loads((path / SIDECAR).read_text()))
        if settings.get("teacher") == "omni":  # the DiT is its own teacher: no VL model to find, plan or load
            return str(model), {k: v for k, v in settings.items() if not k.startswith("vl_")}
        vl = Path(settings["vl_model"])
        if not vl.is_absolute() and (path / vl).is_dir():  # a VL model shipped inside the model dir
            settings["vl_model"] = str(path / vl)
    return str(model), settings


# ---- the teacher's vision-language encoder -------------------------------------------------------------------
class TeacherVL:
    """Qwen3-VL with Z-Image's text encoder as its language model: (prompt, image) -> hidden_states[layer]."""

    def __init__(self, model, tokenizer, image_processor, chat_template: str):
        self.model = model  # transformers Qwen3VLForConditionalGeneration
        self.tokenizer = tokenizer
        self.image_processor = image_processor  # Qwen2VLImageProcessorPil
        self.chat_template = chat_template
        self.image_token = "<|image_pad|>"
        self.image_token_id = model.config.image_token_id

    @classmethod
    def from_pretrained(cls, path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                        dtype: torch.dtype | None = None) -> TeacherVL:
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        local = Path(path)
        if not local.is_dir():
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(path))
        model = Qwen3VLForConditionalGeneration.from_pretrained(local, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(local)
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(local, **pixels)
        # the processor's template (what AutoProcessor would apply) wins over the tokenizer's
        template = None
        if (local / "chat_template.jinja").exists():
            template = (local / "chat_template.jinja").read_text()
        elif (local / "chat_template.json").exists():
            template = json.loads((local / "chat_template.json").read_text())["chat_template"]
        template = template or tokenizer.chat_template
        if not template:
            raise UserError(f"the VL model at {path} has no chat template (chat_template.jinja/.json or tokenizer's)")
        return cls(model, tokenizer, image_processor, template)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / "chat_template.jinja").write_text(self.chat_template)

    def attach_text_encoder(self, text_encoder: torch.nn.Module) -> None:
        """Make the VL language model use the text encoder's weights (shared tensors, no copy)."""
        lm = self.model.model.language_model
        source = text_encoder.state_dict()
        target = lm.state_dict()
        missing, unexpected = sorted(set(target) - set(source)), sorted(set(source) - set(target))
        wrong = [k for k in target if k in source and source[k].shape != target[k].shape]
        if missing or unexpected or wrong:
            raise UserError(
                "the VL model's language model does not match Z-Image's text encoder: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}; "
                "pass a Qwen3-VL checkpoint of the same text size as --vl-model")
        p = next(text_encoder.parameters())
        self.model.to(device=p.device, dtype=p.dtype)
        params = dict(text_encoder.named_parameters())  # the Parameters themselves: one tensor, one gradient
        lm.load_state_dict({k: params.get(k, v) for k, v in source.items()}, strict=True, assign=True)

    def inputs(self, prompt: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """What Qwen3VLProcessor would give for one user turn [image, prompt]; `image` (3, H, W) in [0, 1]."""
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.tokenizer.apply_chat_template(conv, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        pixels = self.image_processor(images=[image.float().cpu()], do_rescale=False, return_tensors="pt")
        merge = self.image_processor.merge_size
        n_tokens = int(pixels["image_grid_thw"][0].prod()) // (merge * merge)
        if text.count(self.image_token) != 1:
            raise ValueError(f"the VL chat template must emit one {self.image_token} per image, got: {text!r}")
        text = text.replace(self.image_token, self.image_token * n_tokens)
        ids = self.tokenizer(text, return_tensors="pt")
        return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
                "mm_token_type_ids": (ids["input_ids"] == self.image_token_id).int(),
                "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}

    def hidden_states(self, prompts: list[str], images: torch.Tensor, max_length: int,
                      layer: int = -2) -> list[torch.Tensor]:
        """Per sample (L_i, D) hidden states of the language model at `layer`, images (B, 3, H, W) in [0, 1].

        One forward for the batch, its sequences padded on the right: the language model is causal, so a real
        token never sees the padding and reads what a forward of its sample alone gives (the paper encodes one at a
        time). Gradients reach the vision tower when the caller enables them (the embedded model's build trains it).
        """
        p = next(self.model.parameters())
        samples = [self.inputs(prompt, image) for prompt, image in zip(prompts, images)]
        length = max(s["input_ids"].shape[1] for s in samples)

        def padded(key: str) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(s[key], (0, length - s[key].shape[1])) for s in samples])

        inputs = {key: padded(key).to(p.device) for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        inputs["pixel_values"] = torch.cat([s["pixel_values"] for s in samples]).to(p.device, p.dtype)
        inputs["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples]).to(p.device)
        hs = self.model.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        states = hs.hidden_states[layer]
        return [state[mask.bool()][:max_length] for state, mask in zip(states, inputs["attention_mask"])]


# ---- the backbone ------------------------------------------------------------------------------------------------
@BACKBONES.register("z-image", description="Z-Image-Turbo (ZImagePipeline)")
class ZImageBackbone(DiffusersLora, Backbone):
    lora_targets = LORA_TARGETS
    name = "z-image"
    default_model = "Tongyi-MAI/Z-Image-Turbo"
    resolve = staticmethod(resolve_model)

    def __init__(self, pipe, settings: dict, model_id: str, device: str | torch.device | None = None,
                 teacher: TeacherVL | None = None):
        self.pipe = pipe
        self.settings = settings
        self.model_id = model_id
        self.native_steps = int(settings["native_steps"])
        self.stochastic_sampling = bool(pipe.scheduler.config.get("stochastic_sampling", False))
        self.guidance_scale = float(settings.get("guidance_scale", 1.0))  # an undistilled (base) model's CFG
        self.resolution = int(settings["resolution"])
        self.max_sequence_length = int(settings["max_sequence_length"])
        self.teacher_max_length = int(settings["teacher_max_length"])
        # one padded length for text and teacher conds, so any two conds of this backbone concatenate
        self.cond_length = max(self.max_sequence_length, self.teacher_max_length)
        self.teacher_kind = settings.get("teacher", "vl")
        if self.teacher_kind not in TEACHERS:
            raise UserError(f"{model_id}: its {SIDECAR} names teacher {self.teacher_kind!r}; expected one of "
                            f"{', '.join(TEACHERS)} (vl: a Qwen3-VL reads the reference; omni: the DiT reads its "
                            "latents)")
        if self.teacher_kind == "omni" and pipe.transformer.config.get("siglip_feat_dim") is not None:
            raise UserError(f"{model_id}: its DiT reads SigLIP features of condition images (Z-Image-Omni), which "
                            "the omni teacher does not compute; it passes the reference's latents only")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe.to(self.device)
        self.denoiser = pipe.transformer
        for module in (pipe.vae, pipe.text_encoder, pipe.transformer):
            module.requires_grad_(False)
            module.eval()
        self._teacher = teacher
        if teacher is not None:
            self._prepare_teacher(teacher)
        self._text_cache: dict[str | tuple[str, str], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, model: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                        vl_model: str | None = None) -> ZImageBackbone:
        from diffusers import ZImagePipeline

        model = model or cls.default_model
        path, settings = cls.resolve(model)
        if vl_model is not None:
            settings["vl_model"] = vl_model
        pipe = ZImagePipeline.from_pretrained(path, dtype=dtype)
        return cls(pipe, settings, model_id=model_identity(model, path), device=device)

    # ---- conditioning -------------------------------------------------------------------------------
    def _pad(self, embeds: list[torch.Tensor]) -> Cond:
        d = embeds[0].shape[-1]
        out = embeds[0].new_zeros(len(embeds), self.cond_length, d)
        mask = torch.zeros(len(embeds), self.cond_length, dtype=torch.bool, device=out.device)
        for i, e in enumerate(embeds):
            out[i, : len(e)] = e
            mask[i, : len(e)] = True
        return {"prompt_embeds": out, "prompt_mask": mask}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            # the pipeline's own encoding (chat template, hidden_states[-2], cut to the real length)
            embeds = self.pipe._encode_prompt(list(missing), device=self.device,
                                              max_sequence_length=self.max_sequence_length)
            self._text_cache.update(zip(missing, embeds))
        return self._pad([self._text_cache[p] for p in prompts])

    def text_tokens(self, prompts: list[str] | None = None) -> int:
        if not prompts or getattr(self.pipe.tokenizer, "chat_template", None) is None:  # `plan` without it: the maximum
            return self.max_sequence_length
        # as the pipeline's _encode_prompt tokenizes (chat template, cut at max_sequence_length); the embeddings
        # are cut to each prompt's real length, so a forward reads its batch's longest prompt, not the maximum
        tokenizer = self.pipe.tokenizer
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for p in prompts]
        longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
        return min(longest, self.max_sequence_length)

    def blank_cond(self, rows: int, text_tokens: int | None = None) -> Cond:
        return self._blank(rows, text_tokens or self.max_sequence_length)

    def blank_teacher_cond(self, rows: int, text_tokens: int | None = None) -> Cond:
        if self.teacher_kind == "omni":  # the prompt's segment, the two fixed ones and the reference latents
            cond = self._blank(rows, text_tokens or self.max_sequence_length)
            embeds = cond["prompt_embeds"]
            for key, segment in (("omni_first", OMNI_SEGMENTS[0]), ("omni_last", OMNI_SEGMENTS[2])):
                tokens = len(self.pipe.tokenizer(segment).input_ids)  # shapes only: no encoder pass (meta device)
                cond[key] = embeds.new_zeros(rows, tokens, embeds.shape[-1])
            cond["ref_latents"] = embeds.new_zeros(rows, *self.latent_shape())
            return cond
        # the VL teacher's hidden states of prompt and image: its image tokens dominate, so the maximum
        return self._blank(rows, self.teacher_max_length)

    def _blank(self, rows: int, length: int) -> Cond:
        # unpadded (every position real): on the meta device a mask's selection cannot count its True entries
        width = self.pipe.transformer.config.cap_feat_dim
        shape = (rows, length)
        return {"prompt_embeds": torch.zeros(*shape, width, device=self.device, dtype=module_dtype(self.denoiser)),
                "prompt_mask": torch.ones(shape, dtype=torch.bool, device=self.device)}

    @property
    def teacher(self) -> TeacherVL:
        if self._teacher is None:
            s = self.settings
            teacher = TeacherVL.from_pretrained(s["vl_model"], s.get("vl_min_pixels"), s.get("vl_max_pixels"),
                                                dtype=module_dtype(self.pipe.text_encoder))
            self._prepare_teacher(teacher)
            self._teacher = teacher
        return self._teacher

    def _prepare_teacher(self, teacher: TeacherVL) -> None:
        teacher.attach_text_encoder(self.pipe.text_encoder)
        teacher.model.requires_grad_(False)
        teacher.model.eval()

    @torch.no_grad()
    def encode_teacher(self, prompts: list[str], images: torch.Tensor) -> Cond:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"encode_teacher needs one image per prompt, got {len(prompts)} prompts and "
                             f"{images.shape[0]} images")
        return self.teacher_cond(prompts, self.encode_images(images) if self.teacher_kind == "omni" else images)

    # ---- the omni teacher's caption segments -------------------------------------------------------------
    def _segment_states(self, texts: list[str]) -> list[torch.Tensor]:
        """hidden_states[-2] of each raw text (no chat template), cut to its tokens, as ZImageOmniPipeline encodes
        its caption segments; cached unless gradients are on."""
        grad = torch.is_grad_enabled()
        missing = texts if grad else list(dict.fromkeys(t for t in texts if ("omni", t) not in self._text_cache))
        if missing:
            ids = self.pipe.tokenizer(missing, padding="max_length", max_length=self.max_sequence_length,
                                      truncation=True, return_tensors="pt")
            mask = ids.attention_mask.to(self.device).bool()
            states = self.pipe.text_encoder(input_ids=ids.input_ids.to(self.device), attention_mask=mask,
                                            output_hidden_states=True).hidden_states[-2]
            encoded = [state[m] for state, m in zip(states, mask)]
            if grad:
                return encoded
            self._text_cache.update({("omni", t): e for t, e in zip(missing, encoded)})
        return [self._text_cache[("omni", t)] for t in texts]

    def _omni_cond(self, prompts: list[str], ref_latents: torch.Tensor) -> Cond:
        first, last, *middle = self._segment_states(
            [OMNI_SEGMENTS[0], OMNI_SEGMENTS[2], *(OMNI_SEGMENTS[1].format(prompt=p) for p in prompts)])
        cond = self._pad(middle)
        cond["omni_first"] = first.expand(len(prompts), -1, -1)
        cond["omni_last"] = last.expand(len(prompts), -1, -1)
        cond["ref_latents"] = ref_latents.to(self.device, torch.float32)
        return cond

    # ---- what a build of the embedded model trains through (dopsd_bench/world/build.py) -------------------
    def reference_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A reference as the teacher reads it: the VL teacher its pixels (B, 3, H, W) in [-1, 1], kept in half
        precision; the omni teacher its latents."""
        return self.encode_images(images) if self.teacher_kind == "omni" else images.half()

    def teacher_cond(self, prompts: list[str], references: torch.Tensor) -> Cond:
        """The teacher conditioning of `reference_inputs`; gradients reach the text encoder's token embeddings and
        the VL model where enabled."""
        if self.teacher_kind == "omni":
            return self._omni_cond(list(prompts), references)
        pixels = ((references.float() + 1) / 2).clamp(0, 1)  # the paper hands the VL processor [0, 1] tensors
        return self._pad(self.teacher.hidden_states(list(prompts), pixels, self.teacher_max_length))

    def trainable_cond(self, prompts: list[str], references: torch.Tensor | None = None) -> Cond:
        """`encode_prompts` (or the teacher's conditioning with `references`) without the cache, so gradients
        reach the token embeddings and the VL model's vision tower."""
        if references is not None:
            return self.teacher_cond(prompts, references)
        return self._pad(self.pipe._encode_prompt(list(prompts), device=self.device,
                                                  max_sequence_length=self.max_sequence_length))

    def reference_encoder(self) -> torch.nn.Module | None:
        """The teacher's part that only the teacher reads (the VL vision tower): a build trains it with the DiT.
        The omni teacher has none: the DiT reads the reference's latents."""
        return None if self.teacher_kind == "omni" else self.teacher.model.model.visual

    # ---- latents ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(images.to(self.device, module_dtype(vae))).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.to(self.device, module_dtype(vae)) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0].float()

    def latent_shape(self) -> tuple[int, int, int]:
        side = 2 * (self.resolution // (self.pipe.vae_scale_factor * 2))
        return (self.pipe.transformer.config.in_channels, side, side)

    # ---- the model ----------------------------------------------------------------------------------
    def predict_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        b = x.shape[0]
        dtype = module_dtype(self.denoiser)
        t = 1 - torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(b)  # Z-Image: t = 1 - sigma
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # (C, F=1, h, w) per sample
        embeds = cond["prompt_embeds"].to(dtype)
        caps = [e[m] for e, m in zip(embeds, cond["prompt_mask"])]
        if "ref_latents" in cond:  # the omni teacher: [reference, target] images around three caption segments
            refs = cond["ref_latents"].to(dtype).unsqueeze(2).unbind(0)
            images = [[r, x] for r, x in zip(refs, latents)]
            segments = [[first, cap, last] for first, cap, last in
                        zip(cond["omni_first"].to(dtype), caps, cond["omni_last"].to(dtype))]
            out = self.denoiser(images, t, segments, siglip_feats=[None] * b, image_noise_mask=[[0, 1]] * b,
                                return_dict=False)[0]
        else:
            out = self.denoiser(latents, t, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(x.dtype)  # the model predicts x0 - eps

    def sigmas(self, steps: int) -> torch.Tensor:
        """As ZImagePipeline.__call__ computes them: linspace(1, 1/steps), the scheduler's shift, then 0."""
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
            retrieve_timesteps,
        )

        scheduler = copy.deepcopy(self.pipe.scheduler)
        _, h, w = self.latent_shape()
        cfg = scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
        return scheduler.sigmas.float().cpu()
