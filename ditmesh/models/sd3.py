"""Stable Diffusion 3 / 3.5: MM-DiT with joint blocks, 2-D sin-cos position embedding added in
patch embedding, joint attention with text tokens last."""

from ditmesh.models.base import ModelAdapter, register

ADAPTER = register(
    ModelAdapter(
        name="sd3",
        pipeline_classes=("StableDiffusion3Pipeline",),
        model_classes=("SD3Transformer2DModel",),
        size_multiple=16,
        cfg_mode="batched",
        joint_text="last",
        # sequence_plan: filled by the sequence-parallel work
        # tensor_plan: filled by the tensor-parallel work
        # stage_plan: filled by the PipeFusion work
    )
)
