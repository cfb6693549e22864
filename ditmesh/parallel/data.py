"""Data parallelism: the images of one pipeline call are split across the data axis.

A call ``pipe(prompt=[p0, p1, p2], num_images_per_prompt=k, ...)`` asks for n = 3k images, in
diffusers' order (prompt-major: p0's k images, then p1's, ...). Data group g generates a
contiguous share of them (uneven shares differ by at most one image; a group with no share
idles), and the ranks of data group 0 (global rank 0 among them) gather all n images back in
order. Ranks of the other groups return their own share (``None`` when it is empty).

Seeds: image i is always drawn from its own generator, so the result does not depend on the
data degree. With ``generator=torch.Generator(device).manual_seed(s)`` image i uses seed s + i:
the call equals the serial call ``pipe(..., generator=[torch.Generator(device).manual_seed(s + i)
for i in range(n)])`` (for one image: the serial call with the same generator). A list of n
generators is split as given. Without a generator, rank 0 picks a seed and broadcasts it, so all
ranks that share an image draw the same noise.

`DataParallelPipeline` is also the outermost wrapper for every parallel config (data degree 1
included): it checks the image size against the model (`adapter.size_multiple`) and makes the
noise agree across the ranks that cooperate on an image.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ditmesh.parallel import lora
from ditmesh.parallel.mesh import ParallelMesh


def apply(pipe: Any, mesh: ParallelMesh, adapter: Any, config: Any) -> Any:
    """Split the images of each call of `pipe` across the data axis; returns the wrapped pipeline."""
    return DataParallelPipeline(pipe, mesh, adapter)


class DenoiserWrapper(nn.Module):
    """A denoiser stand-in: subclasses override `forward`; every other attribute (config, dtype,
    cache_context, ...) reaches the wrapped denoiser `inner`, so pipelines use it as the denoiser."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.inner = denoiser

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


class PipelineWrapper:
    """A pipeline stand-in: subclasses override `__call__` (by default calls pass through);
    everything else reaches the pipeline, its LoRA methods the models inside ditmesh's wrappers."""

    def __init__(self, pipe: Any):
        object.__setattr__(self, "_pipe", pipe)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pipe(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return lora.reach_models(self._pipe, name, getattr(self._pipe, name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._pipe, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._pipe!r})"


class DataParallelPipeline(PipelineWrapper):
    """A pipeline whose calls split their images across the data axis (see the module docstring)."""

    def __init__(self, pipe: Any, mesh: ParallelMesh, adapter: Any):
        super().__init__(pipe)
        self._mesh = mesh
        self._adapter = adapter

    def __call__(self, prompt: Any = None, **kwargs: Any) -> Any:
        kwargs["prompt"] = prompt
        check_size(self._adapter, kwargs.get("height"), kwargs.get("width"))
        num_prompts = _num_prompts(kwargs)
        per_prompt_arg = self._adapter.per_prompt_arg  # num_images_per_prompt; video: num_videos_per_prompt
        per_prompt = kwargs.pop(per_prompt_arg, None) or 1
        num_images = num_prompts * per_prompt
        if num_images < 1:
            raise ValueError(f"the call asks for {num_images} images; pass at least one prompt and {per_prompt_arg} >= 1")
        generators = per_image_generators(kwargs.pop("generator", None), num_images)
        start, stop = shard(num_images, self._mesh.size("data"), self._mesh.rank("data"))
        local = _slice_call(kwargs, num_prompts, per_prompt, start, stop)
        one = {per_prompt_arg: 1}
        if self._mesh.size("data") == 1:
            return self._pipe(**local, generator=generators[start:stop], **one)
        out, failure = None, None
        try:
            if stop > start:  # a data group with no share runs nothing: no per-step collective of its own
                out = self._pipe(**local, generator=generators[start:stop], **one)
        except Exception as error:  # noqa: BLE001 - it travels in the gather, then is raised here
            failure = error
        return self._gather(out, kwargs.get("return_dict", True), failure)

    def _gather(self, out: Any, return_dict: bool, failure: Exception | None) -> Any:
        """Data rank 0 of each group receives every group's share; a group that failed (raised,
        or stopped on a cancel) sends its exception instead, so every rank still reaches this
        one collective (no group is left waiting for one that raised) and rank 0 raises it."""
        images = None if out is None else out[0]  # the output's first field: images (video: frames)
        share = _Failure.of(failure) if failure is not None else _to_cpu(images)
        shares = [None] * self._mesh.size("data") if self._mesh.rank("data") == 0 else None
        dist.gather_object(share, shares, dst=self._mesh.group_ranks("data")[0], group=self._mesh.group("data"))
        if failure is not None:
            raise failure
        if shares is None:
            return out
        for group, share in enumerate(shares):
            if isinstance(share, _Failure):
                raise share.error(group)
        assert out is not None, "data group 0 always has a share"
        combined = _concat([share for share in shares if share is not None], like=images)
        if return_dict:
            setattr(out, next(iter(out.keys())), combined)
            return out
        return (combined, *out[1:])


class _Failure:
    """A data group's exception as it travels to data rank 0 (pickled whole where it can be)."""

    def __init__(self, error: Exception | None, text: str):
        self._error, self._text = error, text

    @classmethod
    def of(cls, error: Exception) -> _Failure:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - unpicklable: keep its type name and message
            return cls(None, f"{type(error).__name__}: {error}")
        return cls(error, f"{type(error).__name__}: {error}")

    def error(self, group: int) -> Exception:
        """The exception to raise on data rank 0: the group's own where it travelled whole."""
        if self._error is not None:
            return self._error
        return RuntimeError(f"data group {group} failed: {self._text}")


def check_size(adapter: Any, height: int | None, width: int | None) -> None:
    """Raise `ValueError` naming valid sizes unless height and width are multiples of the model's."""
    multiple = adapter.size_multiple
    for name, value in (("height", height), ("width", width)):
        if value is None or value % multiple == 0:
            continue
        lower = value // multiple * multiple
        valid = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
        raise ValueError(f"{name} {value} is not a multiple of {multiple} ({adapter.name}); use {valid}")


def per_image_generators(generator: Any, num_images: int) -> list[torch.Generator]:
    """One generator per image: a list is kept; a generator seeded s gives seeds s, s+1, ...;
    None gives a seed picked on rank 0 and broadcast (collective when torch.distributed is up)."""
    if isinstance(generator, list):
        if len(generator) != num_images:
            raise ValueError(f"got {len(generator)} generators for {num_images} images; pass one generator or {num_images}")
        return generator
    if generator is None:
        seed = [int(torch.randint(0, 2**62, ()))]
        if dist.is_initialized():
            dist.broadcast_object_list(seed, src=0)
        generator = torch.Generator().manual_seed(seed[0])
    base = generator.initial_seed()
    return [torch.Generator(generator.device).manual_seed(base + i) for i in range(num_images)]


def shard(num_items: int, num_shards: int, index: int) -> tuple[int, int]:
    """[start, stop) of shard `index` when `num_items` split into `num_shards` near-equal runs."""
    base, extra = divmod(num_items, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def _num_prompts(kwargs: dict[str, Any]) -> int:
    prompt = kwargs.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    if kwargs.get("prompt_embeds") is not None:
        return kwargs["prompt_embeds"].shape[0]
    raise ValueError("pass prompt= (a string or a list of strings) or prompt_embeds=")


def _slice_call(kwargs: dict[str, Any], num_prompts: int, per_prompt: int, start: int, stop: int) -> dict[str, Any]:
    """This share's call arguments: per-prompt arguments (lists and tensors with one row per
    prompt: prompts, negative prompts, embeddings) expanded to one row per image and sliced;
    per-image ``latents`` sliced; everything else as given."""
    local = {}
    for name, value in kwargs.items():
        if "prompt" in name and isinstance(value, list) and len(value) == num_prompts:
            value = [item for item in value for _ in range(per_prompt)][start:stop]
        elif "prompt" in name and isinstance(value, torch.Tensor) and value.shape[0] == num_prompts:
            value = value.repeat_interleave(per_prompt, dim=0)[start:stop]
        elif name == "latents" and isinstance(value, torch.Tensor):
            value = value[start:stop]
        local[name] = value
    if isinstance(local.get("prompt"), str):
        local["prompt"] = [local["prompt"]] * (stop - start)
    return local


def _to_cpu(images: Any) -> Any:
    return images.cpu() if isinstance(images, torch.Tensor) else images


def _concat(shares: list[Any], like: Any) -> Any:
    """Shares of images (PIL lists, numpy or torch batches) as one batch of `like`'s kind."""
    if isinstance(like, torch.Tensor):
        return torch.cat(shares).to(like.device)
    if isinstance(like, np.ndarray):
        return np.concatenate(shares)
    return [image for share in shares for image in share]
