"""Tiny random instances of the real architectures: test fixtures and the offline default.

These are the real diffusers classes with tiny configs and seeded random weights, so every
code path (attention processors, RoPE, joint attention, schedulers) is the one a full-size
FLUX / SD3 / SDXL takes. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Text widths shared by the tiny transformers and the tiny text encoders of the pipelines.
T5_DIM = 32
CLIP_DIM = 32
LATENT_CHANNELS = 4


def tiny_flux_transformer(
    *, seed: int = 0, num_heads: int = 4, head_dim: int = 16, num_layers: int = 2, num_single_layers: int = 4
):
    """A `FluxTransformer2DModel` like FLUX.1-dev (guidance-distilled), a few hundred k parameters."""
    from diffusers import FluxTransformer2DModel

    rope_axes = _flux_rope_axes(head_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,  # latents are packed 2x2
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=num_heads,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_DIM,
            guidance_embeds=True,
            axes_dims_rope=rope_axes,
        )
    return model.eval()


def _flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    # FLUX splits the head dim into (index, row, col) RoPE axes, each even: 128 -> (16, 56, 56).
    first = 2 * max(1, head_dim // 8)
    rest = (head_dim - first) // 2
    rest -= rest % 2
    return (head_dim - 2 * rest, rest, rest)


def tiny_sd3_transformer(*, seed: int = 0, num_heads: int = 4, head_dim: int = 16, num_layers: int = 4, sample_size: int = 32):
    """An `SD3Transformer2DModel` like SD3.5 (joint blocks, QK RMSNorm), a few hundred k parameters."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=num_heads,
            joint_attention_dim=T5_DIM,
            caption_projection_dim=num_heads * head_dim,
            pooled_projection_dim=2 * CLIP_DIM,  # CLIP-L and CLIP-G pooled outputs, concatenated
            out_channels=LATENT_CHANNELS,
            pos_embed_max_size=sample_size,
            qk_norm="rms_norm",
        )
    return model.eval()


def flux_transformer_inputs(*, batch: int = 1, height: int = 32, width: int = 32, text_len: int = 8, seed: int = 0):
    """Random keyword inputs for a tiny FLUX transformer at a latent-pixel size (height, width in
    image pixels / 8 as the VAE gives; packed into (height/2 x width/2) tokens)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = height // 2, width // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(batch, h * w, LATENT_CHANNELS * 4, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, T5_DIM, generator=gen),
        pooled_projections=torch.randn(batch, CLIP_DIM, generator=gen),
        timestep=torch.full((batch,), 0.7),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


def sd3_transformer_inputs(*, batch: int = 1, height: int = 32, width: int = 32, text_len: int = 8, seed: int = 0):
    """Random keyword inputs for a tiny SD3 transformer; height/width are latent sizes."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, LATENT_CHANNELS, height, width, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, T5_DIM, generator=gen),
        pooled_projections=torch.randn(batch, 2 * CLIP_DIM, generator=gen),
        timestep=torch.full((batch,), 700.0),
        return_dict=False,
    )


# ---- tiny pipelines: the real diffusers pipeline classes with tiny components ----------------

TINY_PIPELINES = ("tiny-flux", "tiny-sd3", "tiny-sdxl", "tiny-wan", "tiny-flux-random")
"""Names `load_pipeline` builds in code: "tiny-flux" is the trained default (`PRETRAINED`), the others have
seeded random weights ("-random" names the random twin of a trained one; "tiny-sd3", "tiny-sdxl" and
"tiny-wan" are random)."""
TINY_SIZE = 128
"""Default image size (pixels) for the tiny pipelines: 16x16 latents, 64 FLUX/SD3 image tokens."""
_MAX_TOKENS = 77  # CLIP context length, as in the real CLIP tokenizers


def tiny_pipeline(name: str, seed: int = 0):
    """A tiny random "tiny-flux" (`FluxPipeline`), "tiny-sd3" (`StableDiffusion3Pipeline`) or
    "tiny-sdxl" (`StableDiffusionXLPipeline`), built offline and deterministic from `seed`
    (the test fixture: always random; "tiny-flux-random" is the same as "tiny-flux" here, and
    `pretrained_pipeline` is the trained default that ``load_pipeline("tiny-flux")`` gives).

    Real pipeline classes, schedulers, text encoders, tokenizers (built in code, no download)
    and an 8x VAE, so sizes, CFG batching and every code path match the full models; a 128x128
    image in a few steps takes well under a second on a CPU.
    """
    builders = {"tiny-flux": _tiny_flux_pipeline, "tiny-sd3": _tiny_sd3_pipeline, "tiny-sdxl": _tiny_sdxl_pipeline,
                "tiny-wan": tiny_wan_pipeline}
    name = name.removesuffix("-random")
    if name not in builders:
        raise ValueError(f"unknown tiny pipeline {name!r}; use one of {', '.join(TINY_PIPELINES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[name](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_flux_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        transformer=tiny_flux_transformer(seed=seed),
        vae=_tiny_vae(flow=True),
        text_encoder=_tiny_clip(hidden=CLIP_DIM, projection=None),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_tiny_t5(),
        tokenizer_2=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        ),
    )


def _tiny_sd3_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # Prompt embeddings are [CLIP-L hidden ++ CLIP-G hidden, padded to T5 width] then T5 tokens,
    # so the two CLIP hidden widths add up to T5_DIM; their projections (pooled) to 2 * CLIP_DIM.
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed=seed),
        vae=_tiny_vae(flow=True),
        text_encoder=_tiny_clip(hidden=T5_DIM // 2, projection=CLIP_DIM),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_tiny_clip(hidden=T5_DIM // 2, projection=CLIP_DIM),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_tiny_t5(),
        tokenizer_3=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _tiny_sdxl_pipeline(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(seed=seed),
        vae=_tiny_vae(flow=False),
        text_encoder=_tiny_clip(hidden=CLIP_DIM, projection=None),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_tiny_clip(hidden=CLIP_DIM, projection=CLIP_DIM),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
        ),
    )


# ---- the embedded default: a tiny FLUX trained on drawn shapes, shipped as weights -----------

PRETRAINED = {"tiny-flux": "tiny_flux.safetensors"}
"""Trained tiny models: name -> weights file in ditmesh/models/assets (VAE + transformer, fp16),
written by ``python -m ditmesh.models.pretrain tiny-flux`` (docs/default_model.md)."""
ASSETS = Path(__file__).parent / "assets"


def pretrained_pipeline(name: str = "tiny-flux"):
    """The trained tiny model `name` ("tiny-flux"): a `FluxPipeline` that draws the coloured
    shape a prompt names ("a red circle", "a blue square on a yellow background"). Its text
    encoders are seeded random and frozen (built in code); the VAE and transformer are loaded
    from the shipped weights."""
    from safetensors import safe_open

    if name not in PRETRAINED:
        raise ValueError(f"no trained tiny model {name!r}; use one of {', '.join(PRETRAINED)}")
    pipe = pretrained_architecture(name)
    with safe_open(str(ASSETS / PRETRAINED[name]), framework="pt") as weights:
        metadata = weights.metadata()
        for prefix, module in (("vae.", pipe.vae), ("transformer.", pipe.transformer)):
            state = {key[len(prefix):]: weights.get_tensor(key).float() for key in weights.keys() if key.startswith(prefix)}
            module.load_state_dict(state, strict=True)
    pipe.vae.register_to_config(shift_factor=float(metadata["vae.shift_factor"]),
                                scaling_factor=float(metadata["vae.scaling_factor"]))
    return pipe


def pretrained_architecture(name: str = "tiny-flux", seed: int = 0):
    """The pipeline `pretrained_pipeline` loads weights into, before training: a wider tiny FLUX
    (hidden 128: 4 heads x 32) and VAE, and text encoders whose tokenizer knows the caption words."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    if name != "tiny-flux":
        raise ValueError(f"no trained tiny model {name!r}; use one of {', '.join(PRETRAINED)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = FluxPipeline(
            transformer=tiny_flux_transformer(seed=seed, num_heads=4, head_dim=32),
            vae=_tiny_vae(flow=True, channels=(16, 32, 32, 32)),
            text_encoder=_seeded(_tiny_clip(hidden=CLIP_DIM, projection=None), seed),
            tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=_seeded(_tiny_t5(_caption_words()), seed + 1),
            tokenizer_2=tiny_t5_tokenizer(_caption_words()),
            scheduler=FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
            ),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _caption_words() -> tuple[str, ...]:
    from ditmesh.training.shapes import COLOURS, SHAPES

    return (*sorted(COLOURS), *SHAPES, "on", "background")


def _seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Weights from our own generator, parameter by parameter in name order, not the library's
    # initialisers (which change between transformers releases): the frozen encoders the shipped
    # weights were trained with are rebuilt bit for bit by any torch.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            else:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
    return model


def tiny_sdxl_unet(*, seed: int = 0):
    """A `UNet2DConditionModel` like SDXL's (cross-attention on two CLIPs, text-time added
    conditioning), a few hundred k parameters."""
    from diffusers import UNet2DConditionModel

    time_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet2DConditionModel(
            sample_size=16,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=2 * CLIP_DIM,  # both CLIP hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + CLIP_DIM,  # 6 size ids + pooled CLIP-G
            norm_num_groups=16,
        )
    return model.eval()


def _tiny_vae(*, flow: bool, channels: tuple[int, ...] = (8, 8, 16, 16)):
    # Four blocks: the 8x down-scaling of the real VAEs, so size rules are the real ones.
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=TINY_SIZE,
        **(extra if flow else {}),
    ).eval()


def _tiny_clip(*, hidden: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(_clip_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_MAX_TOKENS,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    model_cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    return model_cls(config).eval()


def _tiny_t5(words: tuple[str, ...] = ()):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(_t5_vocab(words)),
        d_model=T5_DIM,
        d_kv=8,
        d_ff=2 * T5_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_clip_tokenizer():
    """A `CLIPTokenizer` (byte-level BPE) over single bytes, built in code: no download."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=_MAX_TOKENS)


def tiny_t5_tokenizer(words: tuple[str, ...] = ()):
    """A `T5Tokenizer` (Unigram) over single characters and a few words (plus `words`), built in code."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(words), extra_ids=0, model_max_length=512)


def _clip_vocab() -> dict[str, int]:
    # Every byte (byte-level alphabet) alone and as a word end, so any text tokenizes.
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [f"{char}</w>" for char in alphabet]
    return {token: i for i, token in enumerate(tokens)}


def _t5_vocab(extra: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    import string

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    words = ["a", "the", "of", "and", "in", "with", "photo", "cat", "dog", "astronaut", "horse"]
    words += [word for word in extra if word not in words]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in words] + [(char, -3.0) for char in chars]
    return pieces


# ---- tiny Wan (video): Wan 2.1 T2V layout; Wan 2.2's two experts and I2V on request ----------

WAN_LATENT_CHANNELS = 4
WAN_FRAMES = 9
"""Default frame count of the tiny Wan pipelines: 3 latent frames (the VAE's 4x causal time scale)."""


def tiny_wan_transformer(*, seed: int = 0, num_heads: int = 4, head_dim: int = 12, num_layers: int = 2,
                         in_channels: int = WAN_LATENT_CHANNELS, image_dim: int | None = None):
    """A `WanTransformer3DModel` like Wan 2.1/2.2 (self-attention with 3-D RoPE and q/k RMSNorm
    across heads, cross-attention to the text), tens of k parameters. `in_channels` 2 x latent + 4
    makes the I2V layout (noise, frame mask, image latents concatenated on channels); `image_dim`
    Wan 2.1 I2V's cross-attention to image-encoder tokens of that width (its text is then 512
    tokens: diffusers' processor splits [image, text] at 512 from the end)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=num_heads,
            attention_head_dim=head_dim,  # RoPE: (t, h, w) = (head_dim - 2 * 2 * (head_dim // 6), ...)
            in_channels=in_channels,
            out_channels=WAN_LATENT_CHANNELS,
            text_dim=T5_DIM,
            freq_dim=16,
            ffn_dim=2 * num_heads * head_dim,
            num_layers=num_layers,
            cross_attn_norm=True,
            rope_max_seq_len=64,
            image_dim=image_dim,
            added_kv_proj_dim=None if image_dim is None else num_heads * head_dim,
        )
    return model.eval()


def wan_transformer_inputs(*, batch: int = 1, frames: int = 3, height: int = 8, width: int = 8, text_len: int = 7,
                           in_channels: int = WAN_LATENT_CHANNELS, image_tokens: int = 0, image_dim: int = 16,
                           seed: int = 0):
    """Random keyword inputs for a tiny Wan transformer; frames/height/width are latent sizes
    (tokens: frames x height/2 x width/2); `image_tokens` > 0 adds image-encoder tokens (Wan 2.1 I2V)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(batch, in_channels, frames, height, width, generator=gen),
        timestep=torch.full((batch,), 700.0),
        encoder_hidden_states=torch.randn(batch, text_len, T5_DIM, generator=gen),
        return_dict=False,
    )
    if image_tokens:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, image_tokens, image_dim, generator=gen)
    return inputs


def tiny_wan_pipeline(seed: int = 0, *, experts: int = 1, image_to_video: bool = False):
    """A tiny random Wan pipeline: `WanPipeline` (Wan 2.1 T2V layout), or with ``experts=2`` the
    Wan 2.2 A14B layout (high-noise `transformer`, low-noise `transformer_2`, switched at
    Wan2.2-T2V's boundary 0.875: of 2 steps, one each), and with `image_to_video` a
    `WanImageToVideoPipeline` of Wan 2.2 I2V's layout (the image's latents concatenated on
    channels, no CLIP image encoder). Offline, deterministic."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    in_channels = 2 * WAN_LATENT_CHANNELS + 4 if image_to_video else WAN_LATENT_CHANNELS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = dict(
            transformer=tiny_wan_transformer(seed=seed, in_channels=in_channels),
            transformer_2=tiny_wan_transformer(seed=seed + 1, in_channels=in_channels) if experts == 2 else None,
            vae=_tiny_wan_vae(),
            text_encoder=_tiny_umt5(),
            tokenizer=tiny_t5_tokenizer(),
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
            boundary_ratio=0.875 if experts == 2 else None,
        )
        pipe = WanImageToVideoPipeline(**parts) if image_to_video else WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_wan_vae():
    # The real VAE's scales (8x space, 4x causal time) with tiny widths.
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8, z_dim=WAN_LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.2, 1.8],
    ).eval()


def _tiny_umt5():
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(_t5_vocab()), d_model=T5_DIM, d_kv=8, d_ff=2 * T5_DIM, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    )
    return UMT5EncoderModel(config).eval()
