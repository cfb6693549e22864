"""Tiny random instances of the real architectures: test fixtures and the offline default.

These are the real diffusers classes with tiny configs and seeded random weights, so every
code path (attention processors, RoPE, joint attention, schedulers) is the one a full-size
FLUX / SD3 / SDXL takes. Nothing is downloaded.
"""

from __future__ import annotations

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
