"""`DiffusionWorker`: a `DistributedWorker` that loads a pipeline, parallelizes it and generates.

    from ditmesh import DistributedRunner
    from ditmesh.runner.diffusion import DiffusionWorker

    async with DistributedRunner(DiffusionWorker, world_size=2) as runner:
        await runner.start(model="tiny-flux", parallel="ulysses=2")   # or model="/models/FLUX.1-dev"
        result = await runner.invoke({"prompt": "a cat", "steps": 4, "seed": 0})
        result["images"][0].save("cat.png")
        async for event in runner.stream({"prompt": "a dog"}, as_text_events=False):
            ...  # {"step": 1, "of": 4}, ..., then the result {"images": [...], "seed": 0, "seconds": ...}

Seeds: image i of a request with ``seed=s`` is drawn from ``torch.Generator().manual_seed(s + i)``
(on the CPU, so the same seed gives the same image on any device and any parallel config).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ditmesh.config import ParallelConfig
from ditmesh.models import adapter_for
from ditmesh.models.loading import load_pipeline
from ditmesh.models.tiny import TINY_PIPELINES, TINY_SIZE
from ditmesh.parallel.parallelize import parallelize
from ditmesh.runner.protocol import RequestCancelled
from ditmesh.runner.worker import DistributedWorker

PREVIEW_SIZE = 64
"""Longest side, in pixels, of the streamed preview images."""


class DiffusionWorker(DistributedWorker):
    """Serves text-to-image requests with a parallelized diffusers pipeline on every rank."""

    def setup(self, model: str = "tiny-flux", parallel: str | ParallelConfig = "ulysses=2", dtype: str = "float32",
              compile: bool | None = None, cuda_graphs: bool | None = None, cache: str | None = None) -> None:
        """Load `model` (a tiny name or a local diffusers folder) in `dtype` on this rank's device
        and parallelize it with `parallel` (a `ParallelConfig` or its string form). `compile` and
        `cuda_graphs` are `parallelize`'s (None: compiled on CUDA, each step one CUDA graph); `cache`
        its step caching (string form of `CacheConfig`, e.g. "fbcache,threshold=0.1")."""
        config = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig.parse(parallel)
        config.check_world_size(self.world_size)
        pipe = load_pipeline(model, dtype=dtype, device=self.device)
        self.default_size = TINY_SIZE if model in TINY_PIPELINES else None  # None: the pipeline's own default
        self.info = _model_info(pipe, model, config, dtype, self.default_size)
        self.pipe = parallelize(pipe, config, compile=compile, cuda_graphs=cuda_graphs, cache=cache)

    def __call__(
        self,
        streaming: bool = False,
        prompt: str | list[str] = "a photo of an astronaut riding a horse",
        negative_prompt: str | None = None,
        steps: int = 4,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        num_images: int = 1,
        guidance: float | None = None,
        preview: bool = False,
        describe: bool = False,
        **pipeline_kwargs: Any,
    ) -> dict[str, Any] | None:
        """Generate `num_images` images per prompt; returns ``{"images": [PIL...], "seed", "seconds"}``
        on rank 0 (None elsewhere). Streaming sends ``{"step": i, "of": steps}`` after each step,
        with ``"preview"`` (a small PIL image of the latents) when `preview` is set. A request its
        caller gives up stops after the current step on every rank (`RequestCancelled`); under
        PipeFusion, whose first step runs the whole pipelined trajectory, after that. Other keyword
        arguments go to the pipeline call as they are (e.g. ``true_cfg_scale`` for FLUX).

        ``describe=True`` generates nothing and returns what requests are checked against
        (`ditmesh serve` asks once): ``{"model", "family", "size_multiple", "default_size", ...}``."""
        if describe:
            return self.info
        started = time.perf_counter()
        call = dict(
            prompt=prompt,
            num_inference_steps=steps,
            height=height or self.default_size,
            width=width or self.default_size,
            generator=torch.Generator().manual_seed(seed),
            num_images_per_prompt=num_images,
            output_type="pil",
            **pipeline_kwargs,
        )
        if negative_prompt is not None:
            call["negative_prompt"] = negative_prompt
        if guidance is not None:
            call["guidance_scale"] = guidance
        call["callback_on_step_end"] = self._after_step(steps, streaming and self.rank == 0,
                                                        preview, call["height"], call["width"])
        out = self.pipe(**call)
        if self.rank != 0:
            return None
        return {"images": out.images, "seed": seed, "seconds": time.perf_counter() - started,
                "computed_steps": getattr(out, "computed_steps", None)}

    def _after_step(self, steps: int, streaming: bool, preview: bool, height: int | None,
                    width: int | None) -> Any:
        """The pipeline's step-end callback: stop if the caller gave up (every rank checks at every
        step, so all stop after the same one), else send the progress event when streaming."""

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if self.cancel_requested():
                raise RequestCancelled(f"the caller gave up the request; stopped after step {step + 1} of {steps}")
            if streaming:
                event: dict[str, Any] = {"step": step + 1, "of": steps}
                if preview and "latents" in callback_kwargs:
                    event["preview"] = latent_preview(callback_kwargs["latents"], height, width)
                self.add_streaming_result(event, as_text_event=True)
            return callback_kwargs

        return on_step_end


def _model_info(pipe: Any, model: str, config: ParallelConfig, dtype: str, default_size: int | None) -> dict[str, Any]:
    """What a server validates requests against, read from the model's adapter and the pipeline."""
    adapter = adapter_for(pipe)
    if default_size is None and getattr(pipe, "default_sample_size", None) and getattr(pipe, "vae_scale_factor", None):
        default_size = pipe.default_sample_size * pipe.vae_scale_factor
    return {"model": model, "family": adapter.name, "pipeline": type(pipe).__name__,
            "size_multiple": adapter.size_multiple, "default_size": default_size, "parallel": str(config),
            "dtype": str(dtype)}


def latent_preview(latents: torch.Tensor, height: int | None = None, width: int | None = None) -> Any:
    """A rough, small RGB picture of the first image's latents (no VAE decode): three latent
    channels scaled to 0..255. Takes (B, C, h, w) latents or packed (B, tokens, features) latents
    laid out row-major on a grid of the image's aspect ratio."""
    from PIL import Image

    latent = latents[0].detach().float().cpu()
    if latent.dim() == 2:  # packed tokens (FLUX): tokens on a rows x cols grid
        aspect = (height or 1) / (width or 1)
        rows = max(1, round((latent.shape[0] * aspect) ** 0.5))
        latent = latent[: rows * (latent.shape[0] // rows)].reshape(rows, -1, latent.shape[1]).permute(2, 0, 1)
    rgb = latent[:3] if latent.shape[0] >= 3 else latent[:1].expand(3, -1, -1)
    low, high = rgb.amin(), rgb.amax()
    pixels = ((rgb - low) / (high - low + 1e-6) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels)
    scale = PREVIEW_SIZE / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
