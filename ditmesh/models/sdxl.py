"""Stable Diffusion XL: U-Net denoiser; data and CFG parallelism."""

from ditmesh.models.base import ModelAdapter, register

ADAPTER = register(
    ModelAdapter(
        name="sdxl",
        pipeline_classes=("StableDiffusionXLPipeline",),
        model_classes=("UNet2DConditionModel",),
        denoiser_attr="unet",
        size_multiple=8,
        cfg_mode="batched",
        vae_attr="vae",
        text_encoder_attrs=("text_encoder", "text_encoder_2"),  # CLIP-L, CLIP-G
    )
)
