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
import torch.distributed as dist

from ditmesh.config import ParallelConfig
from ditmesh.models import adapter_for, denoisers
from ditmesh.models.loading import load_pipeline
from ditmesh.models.tiny import TINY_PIPELINES, TINY_SIZE, WAN_FRAMES
from ditmesh.parallel import lora, quantize as fp8
from ditmesh.parallel.mesh import ParallelMesh
from ditmesh.parallel.parallelize import parallelize
from ditmesh.runner.protocol import RequestCancelled
from ditmesh.runner.worker import DistributedWorker

PREVIEW_SIZE = 64
"""Longest side, in pixels, of the streamed preview images."""


def _load(model: str, dtype: str, device: torch.device, quantize: str | None, config: ParallelConfig) -> Any:
    """`model` on `device`; with fp8, its denoisers travel from the CPU block by block, each fused
    and quantised as it arrives (`quantize.move_quantized`): the GPU never holds their bf16 weights
    (FLUX.1-dev: 11.2 GiB of fp8 instead of a 22.2 GiB bf16 peak). `parallelize` then finds the
    linears quantised and the Q/K/V fused (not under PipeFusion, as the fast path does)."""
    if fp8.normalize(quantize) is None:
        return load_pipeline(model, dtype=dtype, device=device)
    pipe = load_pipeline(model, dtype=dtype)
    adapter = adapter_for(pipe)
    fp8.check(pipe, adapter, quantize, device.type, config.tensor_degree)  # what parallelize would refuse, first
    experts = list(denoisers(pipe, adapter).values())
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and not any(component is expert for expert in experts):
            component.to(device)
    for expert in experts:
        fp8.move_quantized(expert, adapter, quantize, device, fuse_qkv=device.type == "cuda" and config.pipefusion_degree == 1)
    return pipe


class DiffusionWorker(DistributedWorker):
    """Serves text-to-image requests with a parallelized diffusers pipeline on every rank."""

    def setup(self, model: str = "tiny-flux", parallel: str | ParallelConfig = "ulysses=2", dtype: str = "float32",
              compile: bool | None = None, cuda_graphs: bool | None = None, loras: list | None = None,
              max_graphs: int | None = None, warmup: bool = False, lora_dir: str | None = None,
              cache: str | None = None, quantize: str | None = None) -> None:
        """Load `model` (a tiny name or a local diffusers folder) in `dtype` on this rank's device
        and parallelize it with `parallel` (a `ParallelConfig` or its string form). `compile` and
        `cuda_graphs` are `parallelize`'s (None: compiled on CUDA, each step one CUDA graph).
        `loras`: [(path, scale)] loaded before parallelize and all active (`ditmesh.parallel.lora.load`);
        `max_graphs` bounds the CUDA graphs kept; `warmup` runs one 2-step call at the default size
        here, so the compile and capture happen before the first request (seconds in info["warmup_s"]).
        `lora_dir`: a folder of LoRAs loaded by name, inactive; a request turns some on with
        ``loras={"name": scale}`` (`loras` stay on in every request). `cache`: `parallelize`'s step
        caching (string form of `CacheConfig`, e.g. "fbcache,threshold=0.1"). `quantize`: "fp8" or None
        (`parallelize`'s)."""
        config = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig.parse(parallel)
        config.check_world_size(self.world_size)
        pipe = _load(model, dtype, self.device, quantize, config)
        self.default_size = TINY_SIZE if model in TINY_PIPELINES else None  # None: the pipeline's own default
        self.per_prompt_arg, self.call_defaults = _call_conventions(pipe, model)
        self.info = _model_info(pipe, model, config, dtype, self.default_size)
        self.info["loras"] = lora.load(pipe, [tuple(spec) for spec in loras or ()])
        self._fixed_loras = dict(zip(self.info["loras"], [spec[1] for spec in loras or ()]))
        self.info["lora_names"] = lora.load_folder(pipe, lora_dir) if lora_dir else []
        if self.info["lora_names"]:
            lora.activate(pipe, self._fixed_loras)
        self._active_loras = self._fixed_loras
        extra = {} if max_graphs is None else dict(max_graphs=max_graphs)
        mesh = ParallelMesh.build(config) if dist.is_initialized() else None  # None: one process, no group
        self.pipe = parallelize(pipe, config, mesh, compile=compile, cuda_graphs=cuda_graphs, cache=cache,
                                quantize=quantize, **extra)
        self._step_group = _step_group(mesh)
        if warmup:
            started = time.perf_counter()
            # Every rank makes the same call; one image per data group, so every group compiles.
            self.pipe(prompt="warm-up", num_inference_steps=2, height=self.default_size, width=self.default_size,
                      generator=torch.Generator().manual_seed(0), **{self.per_prompt_arg: config.data_degree},
                      **self.call_defaults)
            self.info["warmup_s"] = time.perf_counter() - started

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
        loras: dict[str, float] | None = None,
        **pipeline_kwargs: Any,
    ) -> dict[str, Any] | None:
        """Generate `num_images` images per prompt; returns ``{"images": [PIL...], "seed", "seconds"}``
        on rank 0 (None elsewhere). Streaming sends ``{"step": i, "of": steps}`` after each step,
        with ``"preview"`` (a small PIL image of the latents) when `preview` is set. A request its
        caller gives up stops after the current step on every rank (`RequestCancelled`); under
        PipeFusion, whose first step runs the whole pipelined trajectory, after that. Other keyword
        arguments go to the pipeline call as they are (e.g. ``true_cfg_scale`` for FLUX,
        ``loras={"name": scale}``: LoRAs of setup's `lora_dir` on for this request,
        ``num_frames`` for Wan). A video model returns ``{"videos": [[PIL frame, ...], ...]}``.

        ``describe=True`` generates nothing and returns what requests are checked against
        (`ditmesh serve` asks once): ``{"model", "family", "size_multiple", "default_size", ...}``."""
        if describe:
            return self.info
        started = time.perf_counter()
        self._use_loras(loras or {})
        call = dict(
            prompt=prompt,
            num_inference_steps=steps,
            height=height or self.default_size,
            width=width or self.default_size,
            generator=torch.Generator().manual_seed(seed),
            **{self.per_prompt_arg: num_images},
            output_type="pil",
            **{**self.call_defaults, **pipeline_kwargs},
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
        return {**_outputs(out), "seed": seed, "seconds": time.perf_counter() - started,
                "computed_steps": getattr(out, "computed_steps", None)}

    def _use_loras(self, requested: dict[str, float]) -> None:
        """Turn on setup's LoRAs plus the requested ones of `lora_dir` (same on every rank)."""
        if (error := lora.unknown_names(requested, self.info["lora_names"])) is not None:
            raise ValueError(error)
        wanted = {**self._fixed_loras, **requested}
        if wanted != self._active_loras:
            lora.activate(self.pipe, wanted)
            self._active_loras = wanted

    def _after_step(self, steps: int, streaming: bool, preview: bool, height: int | None,
                    width: int | None) -> Any:
        """The pipeline's step-end callback: stop if the caller gave up (every rank checks at every
        step, so all stop after the same one), else send the progress event when streaming."""

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if self.cancel_requested(self._step_group):
                raise RequestCancelled(f"the caller gave up the request; stopped after step {step + 1} of {steps}")
            if streaming:
                event: dict[str, Any] = {"step": step + 1, "of": steps}
                if preview and "latents" in callback_kwargs:
                    event["preview"] = latent_preview(callback_kwargs["latents"], height, width)
                self.add_streaming_result(event, as_text_event=True)
            return callback_kwargs

        return on_step_end


def _step_group(mesh: ParallelMesh | None) -> Any:
    """The gloo group of this rank's data group: the ranks that run the same denoising steps.

    The per-step cancel check reduces over it, not over all ranks: a data group with no image in
    a call runs no step, so a check over all ranks would leave the busy groups waiting for it for
    ever. `new_subgroups_by_enumeration` is collective over the world: every rank makes every
    group, in `setup`, in the same order."""
    if mesh is None:
        return None
    group, _ = dist.new_subgroups_by_enumeration(mesh.ranks_by("data"), backend="gloo")
    return group


def _call_conventions(pipe: Any, model: str) -> tuple[str, dict[str, Any]]:
    """(the pipeline's outputs-per-prompt argument, call defaults): video pipelines take
    ``num_videos_per_prompt``; the tiny video model makes WAN_FRAMES frames unless asked otherwise."""
    per_prompt_arg = adapter_for(pipe).per_prompt_arg
    video = per_prompt_arg == "num_videos_per_prompt"
    return per_prompt_arg, {"num_frames": WAN_FRAMES} if video and model in TINY_PIPELINES else {}


def _outputs(out: Any) -> dict[str, Any]:
    """``{"images": [PIL...]}``, or for a video pipeline ``{"videos": [[PIL frame...]...]}`` (one
    list of frames per video)."""
    if hasattr(out, "frames"):
        return {"videos": [list(video) for video in out.frames]}
    return {"images": out.images}


def _model_info(pipe: Any, model: str, config: ParallelConfig, dtype: str, default_size: int | None) -> dict[str, Any]:
    """What a server validates requests against, read from the model's adapter and the pipeline."""
    adapter = adapter_for(pipe)
    if default_size is None and getattr(pipe, "default_sample_size", None) and getattr(pipe, "vae_scale_factor", None):
        default_size = pipe.default_sample_size * pipe.vae_scale_factor
    return {"model": model, "family": adapter.name, "pipeline": type(pipe).__name__,
            "size_multiple": adapter.size_multiple, "default_size": default_size, "parallel": str(config),
            "dtype": str(dtype), "video": adapter.per_prompt_arg == "num_videos_per_prompt"}


def latent_preview(latents: torch.Tensor, height: int | None = None, width: int | None = None) -> Any:
    """A rough, small RGB picture of the first image's latents (no VAE decode): three latent
    channels scaled to 0..255. Takes (B, C, h, w) latents or packed (B, tokens, features) latents
    laid out row-major on a grid of the image's aspect ratio."""
    from PIL import Image

    latent = latents[0].detach().float().cpu()
    if latent.dim() == 4:  # video latents (C, frames, h, w): the first frame
        latent = latent[:, 0]
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
