"""FLUX.1 (dev/schnell): MM-DiT with double-stream then single-stream blocks, RoPE over
(text ids, image ids), joint attention with text tokens first."""

from ditmesh.models.base import ModelAdapter, register
from ditmesh.parallel.pipefusion_stages import FLUX_STAGE_PLAN
from ditmesh.parallel.sequence import Gather, SequencePlan, Split
from ditmesh.parallel.tensor import COLWISE, COLWISE_GATHER, ROWWISE, PackedRowwise, TensorPlan

# FluxTransformer2DModel config of FLUX.1-dev (real sizes: benchmarks, meta-device memory counts).
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

ADAPTER = register(
    ModelAdapter(
        name="flux",
        pipeline_classes=("FluxPipeline",),
        model_classes=("FluxTransformer2DModel",),
        size_multiple=16,
        cfg_mode="sequential",
        joint_text="first",
        # Packed image tokens and their RoPE ids are split together (RoPE stays consistent with
        # the tokens); text stays whole on every rank; the final projection is gathered.
        sequence_plan=SequencePlan(
            splits=(Split("", dim=1, input="hidden_states", ndim=3), Split("", dim=0, input="img_ids", ndim=2)),
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
    )
)
