"""Stable Diffusion 3 / 3.5: MM-DiT with joint blocks, 2-D sin-cos position embedding added in
patch embedding, joint attention with text tokens last."""

from ditmesh.models.base import ModelAdapter, register
from ditmesh.parallel.pipefusion_stages import SD3_STAGE_PLAN
from ditmesh.parallel.sequence import Gather, SequencePlan, Split
from ditmesh.parallel.tensor import COLWISE, COLWISE_GATHER, ROWWISE, TensorPlan

# SD3Transformer2DModel config of SD3.5-large (real sizes: benchmarks, meta-device memory counts).
SD35_LARGE_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
)

ADAPTER = register(
    ModelAdapter(
        name="sd3",
        pipeline_classes=("StableDiffusion3Pipeline",),
        model_classes=("SD3Transformer2DModel",),
        size_multiple=16,
        cfg_mode="batched",
        joint_text="last",
        # PatchEmbed adds a position embedding cropped to the input's height/width, so the
        # tokens are split after it (its output); the final projection is gathered.
        sequence_plan=SequencePlan(splits=(Split("pos_embed", dim=1),), gathers=(Gather("proj_out", dim=1),)),
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
    )
)
