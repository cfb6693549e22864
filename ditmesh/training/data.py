"""Training data: a folder of images with captions, encoded once (in parallel) and cached.

A dataset folder holds images (png, jpg, jpeg, webp, bmp) and their captions, either as a
``.txt`` file beside each image or as one ``metadata.jsonl`` with lines
``{"file_name": "cat.png", "text": "a photo of a cat"}`` (the Hugging Face imagefolder layout).

Preprocessing runs the VAE encoder and the text encoders once per example and writes the
results to a cache folder, one safetensors file per example; the examples are split over all
ranks (rank r encodes examples r, r + world, ...), so N GPUs encode N times faster. Training
then reads only the cache: the encoders can be freed before the first step.

Batches come from a `torch.utils.data.DataLoader` over the cache with a `DistributedSampler`
over the data x fsdp ranks: at every micro-step the global batch is the same set of examples
whatever the number of ranks, which is what lets each strategy be compared with a serial run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.json"
_ENCODE_BATCH = 8  # examples per encoder call


@dataclass(frozen=True)
class Example:
    """One training image and its caption."""

    path: Path
    caption: str


# ---- reading and checking the folder --------------------------------------------------------


def read_folder(folder: str | Path, resolution: int, size_multiple: int = 16) -> list[Example]:
    """The examples of a dataset folder, sorted by file name, checked for training at `resolution`.

    Raises `ValueError` naming the fix when the folder has no images, an image has no caption,
    an image is smaller than `resolution` (it would have to be upscaled) or `resolution` is not
    a multiple of `size_multiple` (the model's VAE x patch size).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--data {folder} is not a folder; pass a folder of images with captions")
    if resolution % size_multiple:
        lower = resolution // size_multiple * size_multiple
        raise ValueError(f"resolution {resolution} is not a multiple of {size_multiple}; use {lower or size_multiple} or {lower + size_multiple}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; put the training images there")
    captions = _captions(folder, images)
    _check_sizes(images, resolution)
    return [Example(path, captions[path.name]) for path in images]


def _captions(folder: Path, images: list[Path]) -> dict[str, str]:
    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        for number, line in enumerate(metadata.read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "file_name" not in record or not ({"text", "caption"} & record.keys()):
                    raise ValueError(f"{metadata}:{number} needs 'file_name' and 'text' keys, got {sorted(record)}")
                captions[record["file_name"]] = record.get("text", record.get("caption"))
    for image in images:
        text_file = image.with_suffix(".txt")
        if image.name not in captions and text_file.exists():
            captions[image.name] = text_file.read_text().strip()
    missing = [image.name for image in images if not captions.get(image.name)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} image(s) in {folder} have no caption: {shown}; write each caption in a .txt beside "
            f"its image (e.g. {Path(missing[0]).with_suffix('.txt').name}) or as a line of metadata.jsonl"
        )
    return captions


def _check_sizes(images: list[Path], resolution: int) -> None:
    from PIL import Image

    small = []
    for path in images:
        with Image.open(path) as image:  # reads the header only
            if min(image.size) < resolution:
                small.append(f"{path.name} ({image.size[0]}x{image.size[1]})")
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        raise ValueError(
            f"{len(small)} image(s) are smaller than the training resolution {resolution}: {shown}; "
            f"lower --resolution to at most the smallest side, or remove or replace those images"
        )


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image as a (3, resolution, resolution) tensor in [-1, 1]: shorter side resized, center-cropped."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC) if image.size != size else image
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


# ---- preprocessing: encode once, split over ranks, cache ------------------------------------


def preprocess(pipe: Any, examples: list[Example], cache: str | Path, *, recipe: Any, resolution: int,
               max_sequence_length: int, model_id: str, device: torch.device) -> CachedLatents:
    """Encode every example's image (VAE) and caption (text encoders) into `cache`; return the cache.

    Collective when torch.distributed is initialised: call on every rank. Each rank encodes its
    share (examples rank, rank + world, ...); a cache already written for the same model,
    resolution, text length and files is reused without encoding anything.
    """
    cache = Path(cache)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    fingerprint = _fingerprint(examples, resolution, max_sequence_length, model_id)
    if _cached(cache, fingerprint):  # every rank reads the manifest before any rank writes one
        return CachedLatents(cache)
    _barrier()
    cache.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(examples), world))
    for start in range(0, len(mine), _ENCODE_BATCH):
        indices = mine[start:start + _ENCODE_BATCH]
        _encode(pipe, [examples[i] for i in indices], indices, cache, recipe, resolution, max_sequence_length, device)
    _barrier()  # every share written before the manifest says the cache is complete
    if rank == 0:
        _write_atomic(cache / MANIFEST, json.dumps({"fingerprint": fingerprint, "count": len(examples)}))
    _barrier()
    return CachedLatents(cache)


@torch.no_grad()
def _encode(pipe: Any, examples: list[Example], indices: list[int], cache: Path, recipe: Any, resolution: int,
            max_sequence_length: int, device: torch.device) -> None:
    from safetensors.torch import save_file

    vae = pipe.vae
    pixels = torch.stack([load_image(example.path, resolution) for example in examples]).to(device, vae.dtype)
    # The distribution's mean, not a sample: deterministic, so every rank count caches the same latents.
    latents = vae.encode(pixels).latent_dist.mode()
    latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor  # (B, C, h, w)
    text = recipe.encode_text(pipe, [example.caption for example in examples], max_sequence_length, device)
    for row, index in enumerate(indices):
        tensors = {"latents": latents[row]} | {name: value[row] for name, value in text.items()}
        save_file({name: value.detach().cpu().contiguous() for name, value in tensors.items()}, str(cache / f"{index:06d}.safetensors"))


def _fingerprint(examples: list[Example], resolution: int, max_sequence_length: int, model_id: str) -> str:
    files = [(e.path.name, e.path.stat().st_size, e.path.stat().st_mtime_ns, e.caption) for e in examples]
    record = json.dumps([model_id, resolution, max_sequence_length, files])
    return hashlib.sha256(record.encode()).hexdigest()


def _cached(cache: Path, fingerprint: str) -> bool:
    manifest = cache / MANIFEST
    return manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the cached dataset and its batches ------------------------------------------------------


class CachedLatents(Dataset):
    """Encoded examples in a cache folder: item i is ``{"index": i, "latents": (C, h, w), <text tensors>}``."""

    def __init__(self, cache: str | Path):
        self.cache = Path(cache)
        self.count = json.loads((self.cache / MANIFEST).read_text())["count"]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {"index": torch.tensor(index)} | load_file(str(self.cache / f"{index:06d}.safetensors"))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Micro-steps in one pass over the data (incomplete batches are dropped)."""
    return num_examples // batch_size


def check_dataset_size(num_examples: int, batch_size: int) -> None:
    """`ValueError` unless the data fills at least one global batch."""
    if steps_per_epoch(num_examples, batch_size) == 0:
        raise ValueError(f"the dataset has {num_examples} examples, fewer than batch_size {batch_size}; "
                         f"lower --batch-size to at most {num_examples} or add images")


def batches(dataset: Dataset, *, batch_size: int, batch_rank: int, batch_ranks: int, seed: int,
            start: int = 0, num_workers: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """This rank's share of each global batch, forever: yields (micro-step, batch) from `start` on.

    The order is a fixed function of `seed` and the epoch: `DistributedSampler` shuffles the
    examples with ``seed + epoch`` and deals them out to the `batch_ranks` ranks in turn, so the
    union of the ranks' batches at micro-step m is examples ``perm[m * batch_size : (m + 1) * batch_size]``
    of that epoch for any rank count. Resuming at `start` skips the batches before it without loading them.
    """
    local = batch_size // batch_ranks
    per_epoch = steps_per_epoch(len(dataset), batch_size)
    epoch, skip = divmod(start, per_epoch)
    sampler = DistributedSampler(dataset, num_replicas=batch_ranks, rank=batch_rank, shuffle=True, seed=seed, drop_last=True)
    while True:
        sampler.set_epoch(epoch)
        chunks = list(BatchSampler(sampler, local, drop_last=True))[skip:per_epoch]
        loader = DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers)
        for offset, batch in enumerate(loader):
            yield epoch * per_epoch + skip + offset, batch
        epoch, skip = epoch + 1, 0
