"""Stable Diffusion 3 / 3.5: MM-DiT with joint blocks, 2-D sin-cos position embedding added in
patch embedding, joint attention with text tokens last."""

from __future__ import annotations

from typing import Any

import torch

from ditmesh.models.base import ModelAdapter, register
from ditmesh.plans import COLWISE, COLWISE_GATHER, ROWWISE, Gather, Grid, Patch, QuantPlan, SequencePlan, Split, StagePlan, TensorPlan

# SD3Transformer2DModel config of SD3.5-large (real sizes: benchmarks, meta-device memory counts).
SD35_LARGE_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
)


# ---- PipeFusion stages: the model's own embedders and head on one patch of rows -----------
# Latents (B, C, H, W); tokens are patch_size x patch_size cells, row-major after `pos_embed`.


def _sd3_grid(model: Any, latent: torch.Tensor, kwargs: dict) -> Grid:
    p = model.config.patch_size
    return Grid(rows=latent.shape[-2] // p, cols=latent.shape[-1] // p, unit=p)


def _sd3_embed_image(model: Any, latent: torch.Tensor, kwargs: dict, patch: Patch) -> torch.Tensor:
    # PatchEmbed would centre-crop the position table for the patch's own height; take the
    # rows of the whole image's table instead (the conv is per token, so a patch is exact).
    embed = model.pos_embed
    tokens = embed.proj(latent).flatten(2).transpose(1, 2)  # (B, n, D)
    p = model.config.patch_size
    table = embed.cropped_pos_embed(patch.grid.rows * p, patch.grid.cols * p)  # (1, N, D)
    return (tokens + table[:, patch.tokens]).to(tokens.dtype)


def _sd3_embed_text(model: Any, kwargs: dict) -> torch.Tensor:
    return model.context_embedder(kwargs["encoder_hidden_states"])


def _sd3_block_kwargs(model: Any, kwargs: dict, patch: Patch) -> dict:
    return dict(temb=model.time_text_embed(kwargs["timestep"], kwargs["pooled_projections"]))


def _sd3_head(model: Any, hidden: torch.Tensor, block_kwargs: dict, latent_shape: tuple[int, ...]) -> torch.Tensor:
    hidden = model.proj_out(model.norm_out(hidden, block_kwargs["temb"]))
    p, c = model.config.patch_size, model.out_channels
    h, w = latent_shape[-2] // p, latent_shape[-1] // p
    hidden = hidden.reshape(hidden.shape[0], h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], c, h * p, w * p)


SD3_STAGE_PLAN = StagePlan(
    blocks=("transformer_blocks",),
    block_costs=(1.0,),
    first_stage_modules=("pos_embed", "context_embedder"),
    last_stage_modules=("norm_out", "proj_out"),
    latent_row_dim=2,
    timestep_divisor=1.0,
    grid=_sd3_grid,
    embed_image=_sd3_embed_image,
    embed_text=_sd3_embed_text,
    block_kwargs=_sd3_block_kwargs,
    head=_sd3_head,
)


ADAPTER = register(
    ModelAdapter(
        name="sd3",
        pipeline_classes=("StableDiffusion3Pipeline",),
        model_classes=("SD3Transformer2DModel",),
        size_multiple=16,
        cfg_mode="batched",
        joint_text="last",
        # PatchEmbed adds a position embedding cropped to the input's height/width, so the image
        # tokens are split after it (its output); the text tokens (CLIP + T5, 333 for SD3.5)
        # before the context embedder, a per-token linear; the final projection is gathered.
        sequence_plan=SequencePlan(
            splits=(Split("pos_embed", dim=1), Split("", dim=1, input="encoder_hidden_states", ndim=3, stream="text")),
            gathers=(Gather("proj_out", dim=1),),
        ),
        tensor_plan=TensorPlan(
            layers=(
                # Joint blocks: image (to_*) and text (add_*) streams, heads split colwise, joined
                # back by the rowwise output projections (one all-reduce each). The last block is
                # context_pre_only (no to_add_out, no ff_context); SD3.5-medium adds attn2.
                ("transformer_blocks.*.attn.to_q", COLWISE),
                ("transformer_blocks.*.attn.to_k", COLWISE),
                ("transformer_blocks.*.attn.to_v", COLWISE),
                ("transformer_blocks.*.attn.add_q_proj", COLWISE),
                ("transformer_blocks.*.attn.add_k_proj", COLWISE),
                ("transformer_blocks.*.attn.add_v_proj", COLWISE),
                ("transformer_blocks.*.attn.to_out.0", ROWWISE),
                ("transformer_blocks.*.attn.to_add_out", ROWWISE),
                ("transformer_blocks.*.attn2.to_q", COLWISE),
                ("transformer_blocks.*.attn2.to_k", COLWISE),
                ("transformer_blocks.*.attn2.to_v", COLWISE),
                ("transformer_blocks.*.attn2.to_out.0", ROWWISE),
                ("transformer_blocks.*.ff.net.0.proj", COLWISE),
                ("transformer_blocks.*.ff.net.2", ROWWISE),
                ("transformer_blocks.*.ff_context.net.0.proj", COLWISE),
                ("transformer_blocks.*.ff_context.net.2", ROWWISE),
                # AdaLN modulation (dim -> 6 dim per stream and block) sharded, then all-gathered:
                # its output is one vector per sample indexing the full width (a tiny gather);
                # replicating it would keep a third of SD3.5-large's weights on every rank.
                ("transformer_blocks.*.norm1.linear", COLWISE_GATHER),
                ("transformer_blocks.*.norm1_context.linear", COLWISE_GATHER),
                ("norm_out.linear", COLWISE_GATHER),
            ),
            attention=("transformer_blocks.*.attn", "transformer_blocks.*.attn2"),
        ),
        stage_plan=SD3_STAGE_PLAN,
        # fp8: every linear of the joint blocks; embedders, norm_out and proj_out stay as they are.
        quant_plan=QuantPlan(layers=(
            "transformer_blocks.*.attn*.*", "transformer_blocks.*.attn*.to_out.0", "transformer_blocks.*.ff*.net.0.proj",
            "transformer_blocks.*.ff*.net.2", "transformer_blocks.*.norm1*.linear",
        )),
        cache_blocks=("transformer_blocks",),
        vae_attr="vae",
        text_encoder_attrs=("text_encoder", "text_encoder_2", "text_encoder_3"),  # CLIP-L, CLIP-G, T5-XXL
    )
)
