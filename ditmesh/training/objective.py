"""The training objective: rectified flow (flow matching) with per-example seeded noise.

For clean latents x0, noise n ~ N(0, I) and a time t in (0, 1):

    x_t = (1 - t) * x0 + t * n          target = n - x0

and the transformer, given x_t, the caption's text embeddings and t (plus the guidance value
for guidance-distilled models), predicts the target; the loss is the mean squared error.

t and n are drawn from a generator seeded by (run seed, micro-step, example index), on the CPU,
so every strategy draws the same noise for the same example whichever rank holds it and
whatever the batch split: that is what makes each strategy's weights equal the serial run's.
t is logit-normal (sigmoid of a standard normal), which puts more weight on the middle times.

What training needs to know about a model family (how to encode captions, how to lay out the
model's inputs) is a `Recipe`, registered by the family's adapter name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ditmesh.models import adapter_for


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How to train one model family with the flow-matching objective."""

    encode_text: Callable[[Any, list[str], int, torch.device], dict[str, torch.Tensor]]
    """(pipeline, captions, max_sequence_length, device) -> per-example text tensors, batch dim first."""
    model_inputs: Callable[[Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, float], dict[str, Any]]
    """(model config, batch, x_t (B, C, h, w), t (B,), guidance) -> keyword arguments of the model's forward."""
    pack: Callable[[torch.Tensor], torch.Tensor]
    """Latents (B, C, h, w) -> the layout of the model's prediction (the target's layout)."""
    batch_inputs: tuple[str, ...]
    """Forward arguments with the batch on dim 0, in the order pipeline stages pass them on:
    the image tokens first, the text tokens second, then the conditioning."""
    static_inputs: tuple[str, ...]
    """Forward arguments shared by every example (positional ids)."""


# ---- FLUX -----------------------------------------------------------------------------------


def _flux_encode_text(pipe: Any, captions: list[str], max_sequence_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    prompt_embeds, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device=device, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}  # (B, T, D_t5), (B, D_clip)


def _flux_pack(latents: torch.Tensor) -> torch.Tensor:
    # (B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, as FluxPipeline._pack_latents.
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)  # (row, col) position of each packed token; channel 0 unused
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def _flux_model_inputs(config: Any, batch: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
                       guidance: float) -> dict[str, Any]:
    text = batch["prompt_embeds"]
    return dict(
        hidden_states=_flux_pack(x_t),
        encoder_hidden_states=text,
        pooled_projections=batch["pooled_prompt_embeds"],
        timestep=t,  # in (0, 1): the model scales it by 1000 itself
        guidance=torch.full_like(t, guidance) if config.guidance_embeds else None,
        img_ids=_flux_image_ids(*x_t.shape[-2:]).to(x_t.device),
        txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device),
        return_dict=False,
    )


FLUX = Recipe(
    encode_text=_flux_encode_text,
    model_inputs=_flux_model_inputs,
    pack=_flux_pack,
    batch_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
    static_inputs=("img_ids", "txt_ids"),
)

RECIPES = {"flux": FLUX}


def recipe_for(model_or_pipe: Any) -> Recipe:
    """The `Recipe` of a pipeline's or denoiser's family; `ValueError` for families not trainable yet."""
    name = adapter_for(model_or_pipe).name
    if name not in RECIPES:
        raise ValueError(f"training supports {', '.join(RECIPES)} models; {name} is not trainable yet")
    return RECIPES[name]


# ---- noise, time and loss -------------------------------------------------------------------


def example_seed(seed: int, micro_step: int, index: int) -> int:
    """A 63-bit generator seed for one example at one micro-step (no collisions in practice)."""
    digest = hashlib.sha256(f"{seed}:{micro_step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_noise_and_time(shape: tuple[int, ...], indices: list[int], micro_step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, *shape), t (B,)) for the examples `indices`, fp32 on the CPU, each example from
    its own generator: independent of the batch it sits in and of the rank that draws it."""
    noises, times = [], []
    for index in indices:
        generator = torch.Generator().manual_seed(example_seed(seed, micro_step, index))
        times.append(torch.sigmoid(torch.randn(1, generator=generator)))  # logit-normal t
        noises.append(torch.randn(shape, generator=generator))
    return torch.stack(noises), torch.cat(times)


def flow_matching_example(recipe: Recipe, model_config: Any, batch: dict[str, torch.Tensor], micro_step: int,
                          seed: int, guidance: float, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """(model inputs, target) of one batch of cached examples at `micro_step`, on `device`, fp32."""
    x0 = batch["latents"].float()  # (B, C, h, w)
    noise, t = sample_noise_and_time(tuple(x0.shape[1:]), batch["index"].tolist(), micro_step, seed)
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * noise
    target = recipe.pack(noise - x0)
    on_device = {key: value.to(device).float() for key, value in batch.items() if key not in ("latents", "index")}
    inputs = recipe.model_inputs(model_config, on_device, x_t.to(device), t.to(device), guidance)
    return inputs, target.to(device)


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32: the mean over examples of each example's mean over elements."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())
