"""FLUX.1 (dev/schnell): MM-DiT with double-stream then single-stream blocks, RoPE over
(text ids, image ids), joint attention with text tokens first."""

from __future__ import annotations

from typing import Any

import torch

from ditmesh.models.base import ModelAdapter, register
from ditmesh.plans import (COLWISE, COLWISE_GATHER, ROWWISE, Gather, Grid, PackedRowwise, Patch, QuantPlan, SequencePlan, Split,
                           StagePlan, TensorPlan)

# FluxTransformer2DModel config of FLUX.1-dev (real sizes: benchmarks, meta-device memory counts).
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# AutoencoderKL config of FLUX.1's VAE (real sizes: benchmarks/vae.py builds it with random weights).
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    force_upcast=True,
)


# ---- PipeFusion stages: the model's own embedders and head on one patch of rows -----------
# Packed latents (B, rows*cols, 64), row-major tokens, img_ids[:, 1] = row, img_ids[:, 2] = col.


def _flux_grid(model: Any, latent: torch.Tensor, kwargs: dict) -> Grid:
    rows = int(kwargs["img_ids"][:, 1].max().item()) + 1
    cols = latent.shape[1] // rows
    return Grid(rows=rows, cols=cols, unit=cols)


def _flux_embed_image(model: Any, latent: torch.Tensor, kwargs: dict, patch: Patch) -> torch.Tensor:
    return model.x_embedder(latent)


def _flux_embed_text(model: Any, kwargs: dict) -> torch.Tensor:
    return model.context_embedder(kwargs["encoder_hidden_states"])


def _flux_block_kwargs(model: Any, kwargs: dict, patch: Patch) -> dict:
    dtype = kwargs["encoder_hidden_states"].dtype
    timestep = kwargs["timestep"].to(dtype) * 1000
    pooled = kwargs["pooled_projections"]
    guidance = kwargs.get("guidance")
    if guidance is None:
        temb = model.time_text_embed(timestep, pooled)
    else:
        temb = model.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)
    # RoPE from the patch's own position ids: fresh K is rotated to its true rows, so the stale
    # K kept in the buffers carries the right positions too.
    ids = torch.cat((kwargs["txt_ids"], kwargs["img_ids"][patch.local_tokens]), dim=0)
    return dict(temb=temb, image_rotary_emb=model.pos_embed(ids))


def _flux_head(model: Any, hidden: torch.Tensor, block_kwargs: dict, latent_shape: tuple[int, ...]) -> torch.Tensor:
    return model.proj_out(model.norm_out(hidden, block_kwargs["temb"]))


# FLUX cost per block, from matmul FLOPs per token: a double-stream block sends each token through
# its own stream's weights only (image tokens the image weights, text tokens the text weights):
# q,k,v,out 4 d^2 + MLP d->4d->d 8 d^2 = 12 d^2 multiply-adds; a single-stream block runs q,k,v
# 3 d^2 + MLP in 4 d^2 + fused out projection (5d -> d) 5 d^2 = 12 d^2. Both add one joint
# attention over the same sequence (2 S d per token) and an adaLN on one vector per image. So the
# compute is equal, although a double block holds ~2.4x the parameters (two streams' weights);
# measured on CPU (d=512, 1088 tokens, 1 thread, min of 16 runs) a double block takes 1.16x a
# single one. Stages are balanced for compute (the pipeline runs at its slowest stage's pace),
# so the ranks holding double blocks hold more weights.
FLUX_STAGE_PLAN = StagePlan(
    blocks=("transformer_blocks", "single_transformer_blocks"),
    block_costs=(1.0, 1.0),
    first_stage_modules=("x_embedder", "context_embedder"),
    last_stage_modules=("norm_out", "proj_out"),
    latent_row_dim=1,
    timestep_divisor=1000.0,
    grid=_flux_grid,
    embed_image=_flux_embed_image,
    embed_text=_flux_embed_text,
    block_kwargs=_flux_block_kwargs,
    head=_flux_head,
)


ADAPTER = register(
    ModelAdapter(
        name="flux",
        pipeline_classes=("FluxPipeline",),
        model_classes=("FluxTransformer2DModel",),
        size_multiple=16,
        cfg_mode="sequential",
        joint_text="first",
        # Packed image tokens and their RoPE ids are split together, and so are the text tokens
        # and theirs (the model concatenates the ids [text, image] as it does the tokens, so
        # RoPE stays consistent with each rank's [text shard, image shard]); the final
        # projection (image tokens only) is gathered.
        sequence_plan=SequencePlan(
            splits=(
                Split("", dim=1, input="hidden_states", ndim=3),
                Split("", dim=0, input="img_ids", ndim=2),
                Split("", dim=1, input="encoder_hidden_states", ndim=3, stream="text"),
                Split("", dim=0, input="txt_ids", ndim=2, stream="text"),
            ),
            gathers=(Gather("proj_out", dim=1),),
        ),
        tensor_plan=TensorPlan(
            layers=(
                # Double-stream blocks: image (to_*) and text (add_*) streams, heads split colwise,
                # joined back by the rowwise output projections (one all-reduce each).
                ("transformer_blocks.*.attn.to_q", COLWISE),
                ("transformer_blocks.*.attn.to_k", COLWISE),
                ("transformer_blocks.*.attn.to_v", COLWISE),
                ("transformer_blocks.*.attn.add_q_proj", COLWISE),
                ("transformer_blocks.*.attn.add_k_proj", COLWISE),
                ("transformer_blocks.*.attn.add_v_proj", COLWISE),
                ("transformer_blocks.*.attn.to_out.0", ROWWISE),
                ("transformer_blocks.*.attn.to_add_out", ROWWISE),
                ("transformer_blocks.*.ff.net.0.proj", COLWISE),
                ("transformer_blocks.*.ff.net.2", ROWWISE),
                ("transformer_blocks.*.ff_context.net.0.proj", COLWISE),
                ("transformer_blocks.*.ff_context.net.2", ROWWISE),
                # Single-stream blocks: attention q/k/v and proj_mlp colwise; proj_out reads
                # cat([attn_out, mlp_out]), so its input columns split per part.
                ("single_transformer_blocks.*.attn.to_q", COLWISE),
                ("single_transformer_blocks.*.attn.to_k", COLWISE),
                ("single_transformer_blocks.*.attn.to_v", COLWISE),
                ("single_transformer_blocks.*.proj_mlp", COLWISE),
                ("single_transformer_blocks.*.proj_out", PackedRowwise(("attn.to_q", "proj_mlp"))),
                # AdaLN modulation (3072 -> 18432 per double block: ~27% of FLUX's weights) is
                # sharded too, then all-gathered: its output is one vector per sample that
                # indexes the full width, so the gather is tiny and replicating it would keep
                # over a quarter of the model on every rank.
                ("transformer_blocks.*.norm1.linear", COLWISE_GATHER),
                ("transformer_blocks.*.norm1_context.linear", COLWISE_GATHER),
                ("single_transformer_blocks.*.norm.linear", COLWISE_GATHER),
                ("norm_out.linear", COLWISE_GATHER),
            ),
            attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
        ),
        stage_plan=FLUX_STAGE_PLAN,
        # fp8: every linear of the blocks (attention, fused Q/K/V included; MLPs; the AdaLN
        # modulation); the embedders, norm_out and proj_out stay in the model's dtype.
        quant_plan=QuantPlan(layers=(
            "transformer_blocks.*.attn.*", "transformer_blocks.*.attn.to_out.0",
            "transformer_blocks.*.ff*.net.0.proj", "transformer_blocks.*.ff*.net.2", "transformer_blocks.*.norm1*.linear",
            "single_transformer_blocks.*.attn.*", "single_transformer_blocks.*.proj_mlp",
            "single_transformer_blocks.*.proj_out", "single_transformer_blocks.*.norm.linear",
        )),
        cache_blocks=("transformer_blocks", "single_transformer_blocks"),
        vae_attr="vae",
        text_encoder_attrs=("text_encoder", "text_encoder_2"),  # CLIP-L, T5-XXL
    )
)
