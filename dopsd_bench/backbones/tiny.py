"""Tiny random-config pipelines of the real diffusers architectures, built in-process with no hub access.

Used by the tests (like diffusers' own tiny configs) and, with trained weights, as the architecture of the embedded
"glyphworld" model. The tokenizer is a byte-level BPE trained here on a small caption corpus (transformers 5
builds a Qwen2 tokenizer from a vocab and merges).

    python -c "from dopsd_bench.backbones.tiny import tiny_flux2_klein_pipeline as t; print(t())"
"""

from __future__ import annotations

import json

import torch

# a plain chat template: the Flux2 pipelines call apply_chat_template on every prompt
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def default_corpus() -> list[str]:
    """Captions of the embedded world plus filler words, so common words become single tokens."""
    import numpy as np

    from dopsd_bench.world import render

    rng = np.random.default_rng(0)
    lines = [render.caption(render.random_scene(rng)) for _ in range(400)]
    lines += [" ".join(render.HELD_OUT_GLYPHS) + " " + " ".join(render.HELD_OUT_STYLES)] * 20
    lines += ["a photo of a dog", "a painting in the style of sks", "a cat on a mat"] * 5
    return lines


def bpe_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A Qwen2 (byte-level BPE) tokenizer trained on `corpus`, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or default_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    qtok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    qtok.chat_template = CHAT_TEMPLATE
    return qtok


def tiny_flux2_transformer(in_channels: int, text_dim: int, width: int = 64, dit_layers: tuple[int, int] = (1, 3),
                           head_dim: int = 32):
    """A random-init Flux2 DiT: `width` / `head_dim` heads, `dit_layers` = (double-stream, single-stream) blocks,
    reading `in_channels` per latent token and text hidden states of `text_dim`."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=dit_layers[0], num_single_layers=dit_layers[1],
        attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=text_dim,
        timestep_guidance_channels=64, mlp_ratio=3.0, axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=False)


def tiny_flux2_klein_pipeline(seed: int = 0, width: int = 64, layers: tuple[int, int] = (1, 2),
                              latent_channels: int = 8,
                              vae_channels: tuple[int, ...] = (32, 64, 64), corpus: list[str] | None = None,
                              dit_layers: tuple[int, int] = (1, 3), head_dim: int = 32, resolution: int = 32):
    """A random-init Flux2KleinPipeline: Qwen3 text encoder, Flux2 DiT, Flux2 VAE (4x down), 32x32 images.

    `width` / `head_dim` attention heads; `dit_layers` = (double-stream, single-stream) blocks; `resolution` is the
    adapter's image size (larger sizes for benchmarks: scripts/bench_gpu.py).

    Returns (pipe, settings) where settings is the adapter's sidecar (dopsd_bench.json) for this model.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(corpus)
    text_hidden = 64
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=128, num_hidden_layers=max(layers),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True))
    # a frozen random encoder: unit-scale token embeddings keep each word's identity clear in the hidden states the
    # DiT reads (at the default 0.02 scale the layers' random mixing drowns it)
    torch.nn.init.normal_(text_encoder.model.embed_tokens.weight, std=1.0)
    transformer = tiny_flux2_transformer(4 * latent_channels, text_hidden * len(layers), width, dit_layers, head_dim)
    n = len(vae_channels)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=vae_channels, layers_per_block=1, latent_channels=latent_channels, norm_num_groups=16,
        sample_size=32, mid_block_add_attention=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)
    settings = {"native_steps": 4, "resolution": resolution, "text_encoder_out_layers": list(layers),
                "max_sequence_length": 24}
    return pipe, settings


# Qwen3's chat format (what Z-Image's pipeline applies, with enable_thinking=True) and Qwen3-VL's for [image, text]
# user turns; enough of the real templates for single user messages
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>"]


def tiny_z_image_pipeline(seed: int = 0, dim: int = 32, latent_channels: int = 4, corpus: list[str] | None = None,
                          n_layers: int = 2, n_refiner_layers: int = 1, n_heads: int = 2,
                          axes_dims: tuple[int, int, int] = (8, 4, 4), resolution: int = 32,
                          text_hidden: int = 32, text_layers: int = 3, vae=None, vision: dict | None = None,
                          shift: float = 3.0):
    """A random-init ZImagePipeline (Qwen3 text encoder, Z-Image DiT, 4x-down AutoencoderKL, 32x32 images) and
    its teacher: a tiny Qwen3-VL whose text config is the text encoder's.

    The DiT has `n_layers` main and `n_refiner_layers` refiner blocks of `n_heads` heads of dim // n_heads, whose
    RoPE axes `axes_dims` sum to; `resolution` is the adapter's image size (the teacher still sees 32x32 pixels).
    The text encoder is `text_layers` Qwen3 layers of `text_hidden`; `vae` (an AutoencoderKL of `latent_channels`)
    replaces the new one; `vision` overrides the teacher's vision tower config (`tiny_qwen3_vl_teacher`); `shift`
    is the scheduler's.

    Returns (pipe, settings, teacher): settings is the adapter's sidecar (dopsd_bench.json) and names the teacher's
    folder inside the model dir, so save with

        pipe.save_pretrained(d); teacher.save_pretrained(d / settings["vl_model"])
        (d / "dopsd_bench.json").write_text(json.dumps(settings))
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = bpe_tokenizer(corpus)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_config = {"vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
                   "num_hidden_layers": text_layers, "num_attention_heads": text_hidden // 16,
                   "num_key_value_heads": max(1, text_hidden // 32), "head_dim": 16, "max_position_embeddings": 512}
    text_encoder = Qwen3Model(Qwen3Config(**text_config, tie_word_embeddings=True))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=dim, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads, qk_norm=True,
        cap_feat_dim=text_config["hidden_size"], axes_dims=list(axes_dims),
        axes_lens=[512, max(32, resolution // 8), max(32, resolution // 8)])
    with torch.no_grad():  # created with torch.empty; fix them so saved weights are finite
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    vae = vae if vae is not None else AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)

    teacher = tiny_qwen3_vl_teacher(tokenizer, text_config, text_encoder.config.rope_parameters["rope_theta"],
                                    vision)
    settings = {"native_steps": 4, "resolution": resolution, "max_sequence_length": 48, "teacher_max_length": 96,
                "vl_model": "teacher_vl", "vl_min_pixels": 32 * 32, "vl_max_pixels": 32 * 32}
    return pipe, settings, teacher


def tiny_qwen3_vl_teacher(tokenizer, text_config: dict, rope_theta: float, vision: dict | None = None):
    """The Z-Image teacher of `tiny_z_image_pipeline`: a random-init Qwen3-VL whose text config is the text
    encoder's (`text_config`, `rope_theta`), with a tiny vision tower that sees 32x32 pixels (`vision` overrides its
    config: depth, hidden_size, intermediate_size, num_heads, patch_size), and a copy of the pipeline's `tokenizer`
    with Qwen3-VL's chat template."""
    import copy

    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from dopsd_bench.backbones.zimage import TeacherVL

    vl_tokenizer = copy.deepcopy(tokenizer)
    vl_tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    ids = {name: vl_tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    head_dim = text_config["head_dim"]
    vision_config = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
                     "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": text_config["hidden_size"],
                     "deepstack_visual_indexes": [0], **(vision or {})}
    patch = vision_config["patch_size"]
    vision_config["num_position_embeddings"] = (32 // patch) ** 2  # one learned position per patch of 32x32
    vl_config = Qwen3VLConfig(
        text_config={**text_config, "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                                        "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
                                                        "mrope_interleaved": True}},
        vision_config=vision_config, **ids)
    vl_model = Qwen3VLForConditionalGeneration(vl_config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2,
                                               min_pixels=32 * 32, max_pixels=32 * 32,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return TeacherVL(vl_model, vl_tokenizer, image_processor, QWEN3_VL_CHAT_TEMPLATE)
