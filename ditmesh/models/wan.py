"""Wan 2.1 / 2.2 video: a DiT over (frames x rows x cols) tokens of the 3-D VAE's latent, each
block self-attention (3-D RoPE, q/k RMSNorm across all heads), cross-attention to the UMT5 text
(and, in Wan 2.1 I2V, to CLIP image tokens) and an MLP, modulated by one shared timestep
projection. Wan 2.2 A14B runs two such experts: `transformer` for the high-noise steps,
`transformer_2` for the low-noise ones; both get every strategy.

Video tokens are what gets long (Wan2.1-14B at 720p, 81 frames: 21 x 45 x 80 = 75,600 per step),
so sequence parallelism splits them; the text (512 tokens) is only ever keys/values of the
cross-attention, so it stays whole on every rank and cross-attention needs no exchange.
"""

from __future__ import annotations

from ditmesh.models.base import ModelAdapter, register
from ditmesh.plans import COLWISE, COLWISE_GATHER, ROWWISE, SHARDED_NORM, Gather, SequencePlan, Split, TensorPlan

# WanTransformer3DModel configs of Wan2.1-T2V-14B and -1.3B (real sizes: benchmarks, meta-device
# memory counts). Wan 2.2 A14B's experts have the 14B architecture (I2V: in_channels 36).
WAN21_14B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN21_1_3B_CONFIG = {**WAN21_14B_CONFIG, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}


# Sequence: the patch embedding's tokens (B, F*H*W, D), frame-major, are split where they enter
# the first block, and the RoPE table (cos, sin: (1, F*H*W, 1, head_dim) each) where it is made,
# so each rank rotates its own tokens by their true positions; the final projection is gathered.
# Every block's self-attention then runs over the mesh (attention.py); its cross-attention
# (`attn2`) keeps the text keys/values whole on every rank and attends its own queries locally.
# The timestep is one value per sample (Wan 2.1, 2.2 A14B); Wan2.2-TI2V-5B's per-token timesteps
# (expand_timesteps) are not split.
WAN_SEQUENCE_PLAN = SequencePlan(
    splits=(
        Split("rope", dim=1, ndim=4),
        Split("blocks.0", dim=1, input="hidden_states", ndim=3),
    ),
    gathers=(Gather("proj_out", dim=1),),
    cross_attention=("blocks.*.attn2",),
)


WAN_TENSOR_PLAN = TensorPlan(
    layers=(
        # Self- and cross-attention: q/k/v colwise (whole heads per rank), output rowwise (one
        # all-reduce). q/k RMSNorm normalises across all heads (qk_norm "rms_norm_across_heads"),
        # so its weight is split with the heads and the mean square is all-reduced.
        ("blocks.*.attn*.to_q", COLWISE),
        ("blocks.*.attn*.to_k", COLWISE),
        ("blocks.*.attn*.to_v", COLWISE),
        ("blocks.*.attn*.norm_q", SHARDED_NORM),
        ("blocks.*.attn*.norm_k", SHARDED_NORM),
        ("blocks.*.attn*.to_out.0", ROWWISE),
        # Wan 2.1 I2V: the CLIP image tokens' keys/values of the cross-attention.
        ("blocks.*.attn2.add_k_proj", COLWISE),
        ("blocks.*.attn2.add_v_proj", COLWISE),
        ("blocks.*.attn2.norm_added_k", SHARDED_NORM),
        ("blocks.*.ffn.net.0.proj", COLWISE),
        ("blocks.*.ffn.net.2", ROWWISE),
        # The shared modulation (dim -> 6 dim, once per step: 157M weights at 14B) sharded, then
        # all-gathered (its output is one vector per sample indexing the full width); the text
        # projection (4096 -> dim -> dim, applied to 512 tokens per call) as a colwise/rowwise pair.
        ("condition_embedder.time_proj", COLWISE_GATHER),
        ("condition_embedder.text_embedder.linear_1", COLWISE),
        ("condition_embedder.text_embedder.linear_2", ROWWISE),
    ),
    attention=("blocks.*.attn1", "blocks.*.attn2"),
)


ADAPTER = register(
    ModelAdapter(
        name="wan",
        pipeline_classes=("WanPipeline", "WanImageToVideoPipeline"),
        model_classes=("WanTransformer3DModel",),
        extra_denoisers=("transformer_2",),
        per_prompt_arg="num_videos_per_prompt",
        size_multiple=16,  # VAE 8 x patch 2
        vae_attr="vae",  # AutoencoderKLWan: decoded split by rows (parallel/vae.py, install_video)
        # Two denoiser calls per step, cond then uncond, on by guidance_scale > 1 (the empty
        # negative prompt is the default).
        cfg_mode="sequential",
        guidance_rule="guidance_scale",
        sequence_plan=WAN_SEQUENCE_PLAN,
        tensor_plan=WAN_TENSOR_PLAN,
        # No stage plan: PipeFusion's patches are bands of token rows of one image; validate
        # refuses pipefusion > 1 for Wan, naming the strategies it takes.
    )
)
