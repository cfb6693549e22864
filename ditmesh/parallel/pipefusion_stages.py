"""PipeFusion stage plans of FLUX and SD3: where each model's blocks, embedders and head are.

A `StagePlan` is what `ditmesh.parallel.pipefusion` needs to know about one family: which
block lists split into stages (and what a block of each list costs), which modules only the
first / last stage keeps, and four small functions that run the model's own embedders and
output head on one patch of image rows. The adapters (`models/flux.py`, `models/sd3.py`) point
at the plans defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Grid:
    """Token layout of one image: `rows` x `cols` tokens; one token row is `unit` entries of the
    latent along the plan's `latent_row_dim`."""

    rows: int
    cols: int
    unit: int


@dataclass(frozen=True)
class Patch:
    """One horizontal band of token rows [row_start, row_stop) of a `grid`; with sequence
    parallelism inside a stage, this rank holds shard `shard` of `num_shards` of its tokens."""

    row_start: int
    row_stop: int
    grid: Grid
    shard: int = 0
    num_shards: int = 1

    @property
    def tokens(self) -> slice:
        """Indices of the patch in the row-major image token sequence."""
        return slice(self.row_start * self.grid.cols, self.row_stop * self.grid.cols)

    @property
    def num_tokens(self) -> int:
        return (self.row_stop - self.row_start) * self.grid.cols

    @property
    def shard_slice(self) -> slice:
        """This rank's tokens, relative to the patch's first token."""
        size = self.num_tokens // self.num_shards
        return slice(self.shard * size, (self.shard + 1) * size)

    @property
    def local_tokens(self) -> slice:
        """This rank's tokens in the image token sequence (all of the patch's without sharding)."""
        start = self.row_start * self.grid.cols
        return slice(start + self.shard_slice.start, start + self.shard_slice.stop)

    def latent(self, dim: int) -> tuple[slice, ...]:
        """Index of the patch's latent entries (rows along `dim`)."""
        unit = self.grid.unit
        return (slice(None),) * dim + (slice(self.row_start * unit, self.row_stop * unit),)


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """How a transformer splits into PipeFusion stages (model knowledge as data + small functions)."""

    blocks: tuple[str, ...]
    """Attributes holding the block lists, in execution order."""
    block_costs: tuple[float, ...]
    """Relative compute per block of each list (matmul FLOPs per token), for balancing stages."""
    first_stage_modules: tuple[str, ...]
    """Embedders only stage 0 runs (other stages drop them)."""
    last_stage_modules: tuple[str, ...]
    """Output head only the last stage runs."""
    latent_row_dim: int
    """Dimension of the pipeline's latent that runs along image rows."""
    timestep_divisor: float
    """The pipeline passes ``scheduler.timesteps[i] / timestep_divisor`` as the model's timestep."""
    grid: Callable[[Any, torch.Tensor, dict], Grid]
    """(model, latent, call kwargs) -> token grid of the image."""
    embed_image: Callable[[Any, torch.Tensor, dict, Patch], torch.Tensor]
    """(model, latent patch, kwargs, patch) -> image tokens (B, n, D) entering the first block."""
    embed_text: Callable[[Any, dict], torch.Tensor]
    """(model, kwargs) -> text tokens (B, T, D) entering the first block."""
    block_kwargs: Callable[[Any, dict, Patch], dict]
    """(model, kwargs, patch) -> keyword arguments of every block (temb, RoPE of this rank's tokens, ...)."""
    head: Callable[[Any, torch.Tensor, dict, tuple[int, ...]], torch.Tensor]
    """(model, image tokens, block kwargs, latent patch shape) -> prediction in the latent's layout."""


# ---- FLUX.1 ---------------------------------------------------------------------------------
# Packed latents (B, rows*cols, 64), row-major tokens, img_ids[:, 1] = row, img_ids[:, 2] = col.


def _flux_grid(model: Any, latent: torch.Tensor, kwargs: dict) -> Grid:
    rows = int(kwargs["img_ids"][:, 1].max().item()) + 1
    cols = latent.shape[1] // rows
    return Grid(rows=rows, cols=cols, unit=cols)


def _flux_embed_image(model: Any, latent: torch.Tensor, kwargs: dict, patch: Patch) -> torch.Tensor:
    return model.x_embedder(latent)


def _flux_embed_text(model: Any, kwargs: dict) -> torch.Tensor:
    return model.context_embedder(kwargs["encoder_hidden_states"])


def _flux_block_kwargs(model: Any, kwargs: dict, patch: Patch) -> dict:
    dtype = kwargs["encoder_hidden_states"].dtype
    timestep = kwargs["timestep"].to(dtype) * 1000
    pooled = kwargs["pooled_projections"]
    guidance = kwargs.get("guidance")
    if guidance is None:
        temb = model.time_text_embed(timestep, pooled)
    else:
        temb = model.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)
    # RoPE from the patch's own position ids: fresh K is rotated to its true rows, so the stale
    # K kept in the buffers carries the right positions too.
    ids = torch.cat((kwargs["txt_ids"], kwargs["img_ids"][patch.local_tokens]), dim=0)
    return dict(temb=temb, image_rotary_emb=model.pos_embed(ids))


def _flux_head(model: Any, hidden: torch.Tensor, block_kwargs: dict, latent_shape: tuple[int, ...]) -> torch.Tensor:
    return model.proj_out(model.norm_out(hidden, block_kwargs["temb"]))


# FLUX cost per block, from matmul FLOPs per token: a double-stream block sends each token through
# its own stream's weights only (image tokens the image weights, text tokens the text weights):
# q,k,v,out 4 d^2 + MLP d->4d->d 8 d^2 = 12 d^2 multiply-adds; a single-stream block runs q,k,v
# 3 d^2 + MLP in 4 d^2 + fused out projection (5d -> d) 5 d^2 = 12 d^2. Both add one joint
# attention over the same sequence (2 S d per token) and an adaLN on one vector per image. So the
# compute is equal, although a double block holds ~2.4x the parameters (two streams' weights);
# measured on CPU (d=512, 1088 tokens, 1 thread, min of 16 runs) a double block takes 1.16x a
# single one. Stages are balanced for compute (the pipeline runs at its slowest stage's pace),
# so the ranks holding double blocks hold more weights.
FLUX_STAGE_PLAN = StagePlan(
    blocks=("transformer_blocks", "single_transformer_blocks"),
    block_costs=(1.0, 1.0),
    first_stage_modules=("x_embedder", "context_embedder"),
    last_stage_modules=("norm_out", "proj_out"),
    latent_row_dim=1,
    timestep_divisor=1000.0,
    grid=_flux_grid,
    embed_image=_flux_embed_image,
    embed_text=_flux_embed_text,
    block_kwargs=_flux_block_kwargs,
    head=_flux_head,
)


# ---- SD3 / SD3.5 ----------------------------------------------------------------------------
# Latents (B, C, H, W); tokens are patch_size x patch_size cells, row-major after `pos_embed`.


def _sd3_grid(model: Any, latent: torch.Tensor, kwargs: dict) -> Grid:
    p = model.config.patch_size
    return Grid(rows=latent.shape[-2] // p, cols=latent.shape[-1] // p, unit=p)


def _sd3_embed_image(model: Any, latent: torch.Tensor, kwargs: dict, patch: Patch) -> torch.Tensor:
    # PatchEmbed would centre-crop the position table for the patch's own height; take the
    # rows of the whole image's table instead (the conv is per token, so a patch is exact).
    embed = model.pos_embed
    tokens = embed.proj(latent).flatten(2).transpose(1, 2)  # (B, n, D)
    p = model.config.patch_size
    table = embed.cropped_pos_embed(patch.grid.rows * p, patch.grid.cols * p)  # (1, N, D)
    return (tokens + table[:, patch.tokens]).to(tokens.dtype)


def _sd3_embed_text(model: Any, kwargs: dict) -> torch.Tensor:
    return model.context_embedder(kwargs["encoder_hidden_states"])


def _sd3_block_kwargs(model: Any, kwargs: dict, patch: Patch) -> dict:
    return dict(temb=model.time_text_embed(kwargs["timestep"], kwargs["pooled_projections"]))


def _sd3_head(model: Any, hidden: torch.Tensor, block_kwargs: dict, latent_shape: tuple[int, ...]) -> torch.Tensor:
    hidden = model.proj_out(model.norm_out(hidden, block_kwargs["temb"]))
    p, c = model.config.patch_size, model.out_channels
    h, w = latent_shape[-2] // p, latent_shape[-1] // p
    hidden = hidden.reshape(hidden.shape[0], h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], c, h * p, w * p)


SD3_STAGE_PLAN = StagePlan(
    blocks=("transformer_blocks",),
    block_costs=(1.0,),
    first_stage_modules=("pos_embed", "context_embedder"),
    last_stage_modules=("norm_out", "proj_out"),
    latent_row_dim=2,
    timestep_divisor=1.0,
    grid=_sd3_grid,
    embed_image=_sd3_embed_image,
    embed_text=_sd3_embed_text,
    block_kwargs=_sd3_block_kwargs,
    head=_sd3_head,
)
