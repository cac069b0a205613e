"""`flux2-klein`: the adapter over diffusers' Flux2KleinPipeline (FLUX.2-klein and the embedded glyphworld model).

Conventions hidden here: 2x2 patchified, batch-norm-normalised VAE latents; packed tokens with 4-D position ids
(T, H, W, L); the transformer takes sigma (the pipeline passes timestep / 1000) and predicts v = eps - x0, which is
already the suite's convention. The teacher context is the pipeline's own multi-reference mechanism: the target
image is VAE-encoded and appended as reference tokens with the time offset T = 10 (`_prepare_image_ids`), and the
output is sliced back to the generated tokens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from dopsd_bench.backbones.base import Backbone, Cond, model_identity, module_dtype
from dopsd_bench.backbones.lora import DiffusersLora
from dopsd_bench.errors import UserError
from dopsd_bench.paths import assets_dir
from dopsd_bench.registry import BACKBONES

# names of the embedded models shipped in the package (dirs under dopsd_bench.paths.assets_dir())
EMBEDDED = {"glyphworld": "glyphworld-turbo", "glyphworld-turbo": "glyphworld-turbo",
            "glyphworld-base": "glyphworld-base"}
# FLUX.2-klein's own settings, used when a model dir has no dopsd_bench.json sidecar
FLUX2_KLEIN_SETTINGS = {"native_steps": 4, "resolution": 1024, "text_encoder_out_layers": [9, 18, 27],
                        "max_sequence_length": 512}
LORA_TARGETS = (r".*(attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
                r"|to_qkv_mlp_proj|single_transformer_blocks\.\d+\.attn\.to_out)$")


def resolve_model(model: str) -> tuple[str, dict]:
    """An embedded name, a local dir or a hub id -> (path or id, adapter settings)."""
    path = assets_dir() / EMBEDDED[model] if model in EMBEDDED else Path(model)
    if model in EMBEDDED and not (path / "model_index.json").exists():
        raise UserError(f"embedded model {model!r} is not built: expected {path}/model_index.json; "
                        "build it with `python scripts/build_world.py`")
    settings = dict(FLUX2_KLEIN_SETTINGS)
    sidecar = Path(path) / "dopsd_bench.json"
    if sidecar.exists():
        settings.update(json.loads(sidecar.read_text()))
    return str(path), settings


@BACKBONES.register("flux2-klein", description="FLUX.2-klein (Flux2KleinPipeline); default model: embedded glyphworld")
class Flux2KleinBackbone(DiffusersLora, Backbone):
    lora_targets = LORA_TARGETS
    name = "flux2-klein"
    default_model = "glyphworld"
    resolve = staticmethod(resolve_model)

    def __init__(self, pipe, settings: dict, model_id: str, device: str | torch.device | None = None):
        self.pipe = pipe
        self.settings = settings
        self.model_id = model_id
        self.native_steps = int(settings["native_steps"])
        self.stochastic_sampling = bool(pipe.scheduler.config.get("stochastic_sampling", False))
        self.guidance_scale = float(settings.get("guidance_scale", 1.0))
        self.resolution = int(settings["resolution"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe.to(self.device)
        self.denoiser = pipe.transformer
        for module in (pipe.vae, pipe.text_encoder, pipe.transformer):
            module.requires_grad_(False)
            module.eval()
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, model: str | None = None, device: str | None = None,
                        dtype: torch.dtype | None = None) -> Flux2KleinBackbone:
        from diffusers import Flux2KleinPipeline

        model = model or cls.default_model
        path, settings = cls.resolve(model)
        pipe = Flux2KleinPipeline.from_pretrained(path, dtype=dtype)
        return cls(pipe, settings, model_id=model_identity(model, path), device=device)

    # ---- conditioning -------------------------------------------------------------------------------
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """The prompt embeddings as the pipeline computes them (its Qwen3 layers `text_encoder_out_layers`), not
        cached; gradients reach the encoder where they are enabled (a build that trains its token embeddings)."""
        return self.pipe._get_qwen3_prompt_embeds(
            self.pipe.text_encoder, self.pipe.tokenizer, prompts, device=self.device,
            max_sequence_length=int(self.settings["max_sequence_length"]),
            hidden_states_layers=list(self.settings["text_encoder_out_layers"]))

    @torch.no_grad()
    def _text_embeds(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            self._text_cache.update(zip(missing, self.text_embeds(missing)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def encode_prompts(self, prompts: list[str]) -> Cond:
        return self.text_cond(self._text_embeds(list(prompts)))

    def text_cond(self, embeds: torch.Tensor) -> Cond:
        """The text conditioning from prompt embeddings (B, L, D) as the text encoder gives them."""
        return {"prompt_embeds": embeds, "text_ids": self.pipe._prepare_text_ids(embeds).to(self.device)}

    def text_tokens(self, prompts: list[str] | None = None) -> int:
        return int(self.settings["max_sequence_length"])  # every prompt is padded to it

    def blank_cond(self, rows: int, text_tokens: int | None = None) -> Cond:
        width = self.pipe.transformer.config.joint_attention_dim
        embeds = torch.zeros(rows, text_tokens or self.text_tokens(), width, device=self.device,
                             dtype=module_dtype(self.pipe.transformer))
        return self.text_cond(embeds)

    def blank_teacher_cond(self, rows: int, text_tokens: int | None = None) -> Cond:
        refs = torch.zeros((rows, *self.latent_shape()), device=self.device, dtype=module_dtype(self.pipe.transformer))
        # the reference image's tokens beside the noisy ones
        return self.with_references(self.blank_cond(rows, text_tokens), refs)

    @torch.no_grad()
    def encode_teacher(self, prompts: list[str], images: torch.Tensor) -> Cond:
        return self.teacher_cond(prompts, self.encode_images(images))

    def teacher_cond(self, prompts: list[str], ref_latents: torch.Tensor) -> Cond:
        """The teacher conditioning from already-encoded reference latents (B, C, h, w)."""
        return self.with_references(self.encode_prompts(prompts), ref_latents)

    # ---- what a build of the embedded model trains through (dopsd_bench/world/build.py) -------------------
    def reference_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A reference as the teacher reads it: its latents (the DiT reads them as reference tokens)."""
        return self.encode_images(images)

    def trainable_cond(self, prompts: list[str], ref_latents: torch.Tensor | None = None) -> Cond:
        """`encode_prompts` (or `teacher_cond` with `ref_latents`) without the cache, so gradients reach the
        text encoder's token embeddings."""
        cond = self.text_cond(self.text_embeds(list(prompts)))
        return cond if ref_latents is None else self.with_references(cond, ref_latents)

    def reference_encoder(self) -> torch.nn.Module | None:
        """Nothing but the DiT reads the references (as latent tokens): nothing more trains with it."""
        return None

    def with_references(self, cond: Cond, ref_latents: torch.Tensor) -> Cond:
        """`cond` with encoded reference latents (B, C, h, w) appended as the pipeline's reference tokens."""
        cond = dict(cond)
        ids = self.pipe._prepare_image_ids([ref_latents[:1]]).to(self.device)  # T = 10: the first reference slot
        cond["ref_latents"] = self.pipe._pack_latents(ref_latents)
        cond["ref_ids"] = ids.expand(ref_latents.shape[0], -1, -1).contiguous()
        return cond

    # ---- latents ------------------------------------------------------------------------------------
    def _bn(self) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, module_dtype(self.pipe.vae))
        latents = self.pipe.vae.encode(images).latent_dist.mode()
        mean, std = self._bn()
        return ((self.pipe._patchify_latents(latents) - mean) / std).float()  # as z-image: fp32 latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn()
        latents = self.pipe._unpatchify_latents(latents.to(module_dtype(self.pipe.vae)) * std + mean)
        return self.pipe.vae.decode(latents, return_dict=False)[0].float()

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // (self.pipe.vae_scale_factor * 2)
        return (self.pipe.transformer.config.in_channels, side, side)

    # ---- the model ----------------------------------------------------------------------------------
    def predict_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.pipe._pack_latents(x)
        ids = self.pipe._prepare_latent_ids(x).to(self.device)
        if "ref_latents" in cond:
            tokens = torch.cat([tokens, cond["ref_latents"].to(tokens.dtype)], dim=1)
            ids = torch.cat([ids, cond["ref_ids"]], dim=1)
        sigma = torch.as_tensor(sigma, device=self.device, dtype=tokens.dtype).expand(b)
        out = self.pipe.transformer(hidden_states=tokens.to(module_dtype(self.denoiser)), timestep=sigma,
                                    encoder_hidden_states=cond["prompt_embeds"], txt_ids=cond["text_ids"],
                                    img_ids=ids, guidance=None, return_dict=False)[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w).to(x.dtype)

    def sigmas(self, steps: int) -> torch.Tensor:
        """As Flux2KleinPipeline.__call__ computes them (linspace, then the scheduler's shift)."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        scheduler = copy.deepcopy(self.pipe.scheduler)
        seq_len = self.latent_shape()[1] * self.latent_shape()[2]
        kwargs = {"mu": compute_empirical_mu(seq_len, steps)} if scheduler.config.use_dynamic_shifting else {}
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device="cpu", **kwargs)
        return scheduler.sigmas.float()
