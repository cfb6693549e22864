"""Load a pipeline by name ("tiny-flux", ...) or from a local folder in diffusers layout.

Nothing is downloaded: a user's FLUX.1-dev / SD3.5 / SDXL folder (what `save_pretrained` or
`huggingface-cli download` writes: ``model_index.json`` plus one subfolder per component) is
read with ``local_files_only=True``. The tiny pipelines are built in code; "tiny-flux" loads the
weights trained on drawn shapes that ship in ditmesh/models/assets ("tiny-flux-random": the
random twin the equal-to-serial tests use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditmesh.models.tiny import PRETRAINED, TINY_PIPELINES, pretrained_pipeline, tiny_pipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(model: str, *, dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = None) -> Any:
    """The diffusers pipeline named `model`: a tiny built-in one ("tiny-flux": trained, draws the
    coloured shape the prompt names; "tiny-flux-random", "tiny-sd3", "tiny-sdxl": seeded random
    weights) or a local folder in diffusers layout; in `dtype`, moved to `device` if given."""
    dtype = resolve_dtype(dtype)
    if model in TINY_PIPELINES:
        pipe = pretrained_pipeline(model) if model in PRETRAINED else tiny_pipeline(model)
        pipe = pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    else:
        pipe = _from_folder(model, dtype)
    return pipe.to(device) if device is not None else pipe


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _from_folder(model: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"model {model!r} is neither a built-in tiny model ({', '.join(TINY_PIPELINES)}) nor a folder; "
            "pass a tiny name or the path of a downloaded diffusers folder (with model_index.json)"
        )
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"no model_index.json in {folder}; pass the folder in diffusers layout that holds it "
            "(e.g. the snapshot folder `huggingface-cli download black-forest-labs/FLUX.1-dev` writes)"
        )
    # diffusers 0.42 renamed torch_dtype to dtype (the old name warns); older releases know only torch_dtype.
    dtype_key = "dtype" if _diffusers_version() >= (0, 42) else "torch_dtype"
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, **{dtype_key: dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_version() -> tuple[int, int]:
    import diffusers

    major, minor = diffusers.__version__.split(".")[:2]
    return int(major), int(minor)
