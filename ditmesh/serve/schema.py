"""The request and response bodies of ``POST /v1/images/generations``, and the checks that need
the model (size multiple, family) on top of the field types and ranges pydantic checks."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ditmesh.parallel.lora import unknown_names

MAX_PROMPT_CHARS = 2000
MAX_SIDE = 4096
MAX_STEPS = 200
MAX_IMAGES = 8
MAX_SEED = 2**32 - 1
MAX_FRAMES = 257
IMAGE_FORMATS = ("png", "jpeg")
VIDEO_FORMATS = ("png", "gif", "webp", "mp4")  # png: an animated PNG (APNG)


class GenerationRequest(BaseModel):
    """What to generate. Unknown keys and values of the wrong type are refused (422), not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                                        description="what to avoid (CFG; FLUX uses it with true_cfg_scale)")
    height: int | None = Field(None, gt=0, le=MAX_SIDE,
                               description="pixels, a multiple of the model's size multiple (16 for FLUX and SD3, "
                                           "8 for SDXL; GET /healthz says); default: the model's")
    width: int | None = Field(None, gt=0, le=MAX_SIDE, description="pixels, like height")
    steps: int = Field(28, ge=1, le=MAX_STEPS, description="denoising steps")
    guidance: float | None = Field(None, ge=0, le=100, description="guidance_scale (default: the pipeline's)")
    true_cfg_scale: float | None = Field(None, ge=1, le=100,
                                         description="FLUX only: true classifier-free guidance (needs negative_prompt)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i; default: a random seed, "
                                                                 "returned in the response")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="images for the prompt")
    output_format: Literal["png", "jpeg", "gif", "webp", "mp4"] = Field(
        "png", description="encoding of the returned files: images png or jpeg; videos png (animated), gif, webp or "
                           "mp4 (mp4 needs ditmesh[video] on the server)")
    num_frames: int | None = Field(None, ge=1, le=MAX_FRAMES,
                                   description="video models (Wan): frames, 4k+1; default: the model's")
    fps: int = Field(16, ge=1, le=60, description="video models: frames per second of the returned files")
    stream: bool = Field(False, description="server-sent events (as with Accept: text/event-stream)")
    preview: bool = Field(False, description="with streaming: a small preview image in every step event")
    loras: dict[str, float] | None = Field(None, max_length=16,
                                           description="LoRAs of the server's --lora-dir to turn on, by name, with "
                                                       "their scales (GET /healthz lists them as lora_names)")

    def payload(self, seed: int, streaming: bool) -> dict[str, Any]:
        """The keyword arguments of `DiffusionWorker.__call__` for this request."""
        payload = dict(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                       height=self.height, width=self.width, seed=seed, num_images=self.num_images,
                       guidance=self.guidance, preview=self.preview and streaming)
        if self.true_cfg_scale is not None:
            payload["true_cfg_scale"] = self.true_cfg_scale
        if self.num_frames is not None:
            payload["num_frames"] = self.num_frames
        if self.loras:
            payload["loras"] = dict(self.loras)
        return payload


class Timings(BaseModel):
    """Where a request's time went, in seconds."""

    queued_s: float = Field(description="waiting for the mesh (earlier requests, a restart)")
    mesh_s: float = Field(description="the runner call: sending, generating on every rank, the result coming back")
    generation_s: float = Field(description="the pipeline call on rank 0")
    encode_s: float = Field(description="encoding the images here")
    total_s: float = Field(description="arrival to response")


class GenerationResponse(BaseModel):
    """The generated images or videos (also the data of the `result` event when streaming)."""

    images: list[str] = Field(description="base64-encoded image files, image i drawn with seed + i (empty for videos)")
    videos: list[str] | None = Field(None, description="video models: base64-encoded video files, video i drawn "
                                                       "with seed + i")
    frames: int | None = Field(None, description="video models: frames per video")
    fps: int | None = Field(None, description="video models: frames per second of the files")
    output_format: Literal["png", "jpeg", "gif", "webp", "mp4"]
    width: int
    height: int
    seed: int
    model: str
    timings: Timings
    computed_steps: list[int] | None = Field(None, description="with step caching (`serve --cache`): the denoising "
                                                               "steps computed (the others reused the cache)")


def model_errors(request: GenerationRequest, info: dict[str, Any]) -> list[dict[str, Any]]:
    """What the model refuses in `request` (validation errors in FastAPI's shape); empty if nothing.

    `info` is the worker's description (`DiffusionWorker(describe=True)`): family, size_multiple."""
    errors = []
    multiple, family = info["size_multiple"], info["family"]
    for name in ("height", "width"):
        value = getattr(request, name)
        if value is not None and value % multiple:
            lower = value // multiple * multiple
            fix = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
            message = f"{name} {value} is not a multiple of {multiple} ({family}); use {fix}"
            errors.append(field_error(name, value, message))
    if request.true_cfg_scale is not None and family != "flux":
        errors.append(field_error("true_cfg_scale", request.true_cfg_scale,
                                  f"true_cfg_scale is for FLUX; this server runs {family}: use guidance instead"))
    elif request.true_cfg_scale is not None and request.negative_prompt is None:
        errors.append(field_error("true_cfg_scale", request.true_cfg_scale,
                                  "true_cfg_scale needs a negative_prompt (the unconditional pass); add one"))
    errors += _video_errors(request, info)
    if (message := unknown_names(request.loras, info.get("lora_names", []))) is not None:
        errors.append(field_error("loras", request.loras, message))
    return errors


def _video_errors(request: GenerationRequest, info: dict[str, Any]) -> list[dict[str, Any]]:
    """What a video model refuses (frame counts its VAE cannot make, image-only formats), and the
    video fields an image model refuses."""
    fmt, frames = request.output_format, request.num_frames
    if not info.get("video"):
        errors = [] if fmt in IMAGE_FORMATS else [field_error(
            "output_format", fmt, f"{fmt} is a video format; this server's {info['family']} model makes images: "
                                  f"use {' or '.join(IMAGE_FORMATS)}")]
        if frames is not None:
            errors.append(field_error("num_frames", frames, f"num_frames is for video models; this server runs "
                                                            f"{info['family']}: leave it out"))
        return errors
    errors = [] if fmt in VIDEO_FORMATS else [field_error(
        "output_format", fmt, f"{fmt} is an image format; a video comes as {', '.join(VIDEO_FORMATS)}")]
    if frames is not None and (frames - 1) % 4:  # the VAE's causal 4x time compression
        lower = (frames - 1) // 4 * 4 + 1
        errors.append(field_error("num_frames", frames, f"num_frames {frames} is not 4k+1; use {lower} or {lower + 4}"))
    if fmt == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        errors.append(field_error("output_format", fmt, "mp4 needs imageio-ffmpeg on the server (pip install "
                                                        "'ditmesh[video]'); ask for webp, gif or png"))
    return errors


def field_error(field: str | None, value: Any, message: str, kind: str = "value_error") -> dict[str, Any]:
    """One validation error as FastAPI reports them: ``{"type", "loc", "msg", "input"}``."""
    return {"type": kind, "loc": ["body", field] if field else ["body"], "msg": message, "input": value}
