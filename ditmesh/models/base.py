"""The adapter interface: what ditmesh knows about one model family, as data.

Strategies read an adapter's plans (where the sequence is split and gathered, the tensor-parallel
plan, how blocks split into pipeline stages, how the pipeline batches CFG); core code never
branches on model types. Each family registers its adapter in its own file (`flux.py`, `sd3.py`,
`sdxl.py`) and `adapter_for(pipe_or_model)` finds it by class name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditmesh.plans import QuantPlan, SequencePlan, StagePlan, TensorPlan

_REGISTRY: dict[str, ModelAdapter] = {}


@dataclass(frozen=True, kw_only=True)
class ModelAdapter:
    """What the strategies need to know about one model family."""

    name: str
    """Short family name: "flux", "sd3", "sdxl"."""
    pipeline_classes: tuple[str, ...]
    """diffusers pipeline class names of this family."""
    model_classes: tuple[str, ...]
    """diffusers denoiser (transformer / U-Net) class names of this family."""
    denoiser_attr: str = "transformer"
    """Attribute of the pipeline holding the denoiser ("transformer" or "unet")."""
    extra_denoisers: tuple[str, ...] = ()
    """Further pipeline attributes holding denoisers of the same architecture that get the same
    strategies (Wan 2.2's low-noise expert "transformer_2"); ones a pipeline sets to None are skipped."""
    per_prompt_arg: str = "num_images_per_prompt"
    """The pipeline call's outputs-per-prompt argument ("num_videos_per_prompt" for video)."""
    guidance_rule: str | None = None
    """What switches classifier-free guidance on in a call: "guidance_scale" (> 1) or "true_cfg"
    (true_cfg_scale > 1 and a negative prompt); None: "guidance_scale" for batched cfg, "true_cfg"
    for sequential."""
    size_multiple: int = 16
    """Height and width must be multiples of this (VAE scale x patch size)."""
    cfg_mode: str = "batched"
    """How the pipeline runs classifier-free guidance: "batched" (cond+uncond in one batch) or
    "sequential" (two denoiser calls per step, FLUX true CFG)."""
    joint_text: str | None = None
    """Where text tokens sit in joint attention's sequence: "first" (FLUX), "last" (SD3), None."""
    sequence_plan: SequencePlan | None = None
    """Where tokens are sharded and gathered for sequence parallelism (None: not supported)."""
    tensor_plan: TensorPlan | None = None
    """Which linears tensor parallelism splits, and how (None: not supported)."""
    stage_plan: StagePlan | None = None
    """How blocks split into PipeFusion stages (None: not supported)."""
    quant_plan: QuantPlan | None = None
    """Which linears fp8 compute quantises (`parallelize(..., quantize="fp8")`; None: not supported)."""
    cache_blocks: tuple[str, ...] = ()
    """Attributes holding the repeated block lists, in execution order, for step caching: the
    first block of the first list decides, the rest are skipped on cached steps (empty: no caching)."""
    vae_attr: str | None = None
    """Attribute of the pipeline holding its VAE, decoded (and encoded) split by rows over the
    ranks that share an image (parallel/vae.py; None: every rank decodes whole)."""
    text_encoder_attrs: tuple[str, ...] = ()
    """Attributes of the pipeline holding its text encoders: `encode_prompt` runs on one rank per
    image and is broadcast, the other ranks drop these (parallel/text.py; (): every rank encodes)."""


def denoisers(pipe: Any, adapter: ModelAdapter) -> dict[str, Any]:
    """Attribute -> denoiser of every denoiser `pipe` holds (`denoiser_attr`, then the
    `extra_denoisers` it sets); ``{"": pipe}`` for a bare denoiser."""
    if not hasattr(pipe, adapter.denoiser_attr):
        return {"": pipe}
    attrs = (adapter.denoiser_attr,) + adapter.extra_denoisers
    return {attr: getattr(pipe, attr) for attr in attrs if getattr(pipe, attr, None) is not None}


def register(adapter: ModelAdapter) -> ModelAdapter:
    """Make `adapter_for` find `adapter` by its pipeline and model class names."""
    for class_name in adapter.pipeline_classes + adapter.model_classes:
        _REGISTRY[class_name] = adapter
    return adapter


def adapter_for(obj: Any) -> ModelAdapter:
    """The adapter of a diffusers pipeline or denoiser (looked up along the class's MRO).

    The families are registered when `ditmesh.models` is imported, which any import of this
    module does first (a package runs before its modules)."""
    for cls in type(obj).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__]
    known = sorted({adapter.name for adapter in _REGISTRY.values()})
    raise ValueError(
        f"ditmesh has no adapter for {type(obj).__name__}; supported families: {', '.join(known)} "
        f"(classes: {', '.join(sorted(_REGISTRY))})"
    )
