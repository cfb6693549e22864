"""LoRA adapters through peft, saved in the format diffusers' ``pipe.load_lora_weights(dir)`` reads.

`add_lora` freezes the transformer and injects peft LoRA layers (``lora_A`` gaussian, ``lora_B``
zero, so training starts at the base model) into the target linears, seeded so every rank and
every strategy starts from the same adapters. `save_lora` writes ``pytorch_lora_weights.safetensors``
through the family's own pipeline class (``FluxPipeline.save_lora_weights``) with the adapter
config as metadata, so alpha is restored on load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditmesh.models import adapter_for

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_ADAPTER = "default"


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """`ValueError` naming the model's linear layers unless every target matches one of them.

    A target matches a layer whose dotted name equals it or ends with ``"." + target`` (peft's rule),
    so "attn.to_q" matches the query projection of every block.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linears)]
    if missing:
        suffixes = sorted({re.sub(r"^.*?\.\d+\.", "", name) for name in linears})
        raise ValueError(
            f"LoRA target(s) {', '.join(missing)} match no linear layer of {type(model).__name__}; "
            f"choose among: {', '.join(suffixes)}"
        )


def add_lora(model: nn.Module, rank: int, alpha: float | None, targets: tuple[str, ...], seed: int) -> None:
    """Freeze `model` and add trainable LoRA adapters of `rank` to the `targets` linears, in place."""
    from peft import LoraConfig

    check_targets(model, targets)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same adapters on every rank and in every strategy
        model.add_adapter(config)


def is_lora_name(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def save_lora(folder: str | Path, model: nn.Module, state: dict[str, torch.Tensor]) -> Path:
    """Write the adapters in `state` (full tensors under the model's parameter names) as a
    diffusers LoRA folder; return the weights file. `model` supplies the adapter config and family."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model, state_dict=state, adapter_name=_ADAPTER)  # names without ".default"
    pipeline_cls = getattr(diffusers, adapter_for(model).pipeline_classes[0])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        folder,
        transformer_lora_layers={name: tensor.contiguous() for name, tensor in layers.items()},
        transformer_lora_adapter_metadata=model.peft_config[_ADAPTER].to_dict(),
    )
    return folder / LORA_WEIGHTS


def save_full(folder: str | Path, model: nn.Module, state: dict[str, torch.Tensor]) -> Path:
    """Write a fully fine-tuned denoiser (every weight in `state`) as a diffusers model folder,
    loadable with ``<ModelClass>.from_pretrained(folder)``; return the folder."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(model.to_json_string())
    # FSDP2 swaps the class for a subclass ("FSDPFluxTransformer2DModel"): name the diffusers class.
    config["_class_name"] = next(cls.__name__ for cls in type(model).__mro__ if cls.__name__ in adapter_for(model).model_classes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def load_lora_pipeline(model: str, folder: str | Path, **kwargs: Any) -> Any:
    """The pipeline `model` (a tiny name or a local folder) with the LoRA in `folder` loaded."""
    from ditmesh.models.loading import load_pipeline

    pipe = load_pipeline(model, **kwargs)
    pipe.load_lora_weights(str(folder))
    return pipe
