"""FLUX.1 (dev/schnell): MM-DiT with double-stream then single-stream blocks, RoPE over
(text ids, image ids), joint attention with text tokens first."""

from ditmesh.models.base import ModelAdapter, register

ADAPTER = register(
    ModelAdapter(
        name="flux",
        pipeline_classes=("FluxPipeline",),
        model_classes=("FluxTransformer2DModel",),
        size_multiple=16,
        cfg_mode="sequential",
        joint_text="first",
        # sequence_plan: filled by the sequence-parallel work
        # tensor_plan: filled by the tensor-parallel work
        # stage_plan: filled by the PipeFusion work
    )
)
