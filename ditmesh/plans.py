"""Plans: what a model family tells the strategies, as plain data.

The bottom layer of ditmesh: `models/` fills these in for each family, `parallel/` reads them,
and this module imports nothing of either. A `ModelAdapter` (models/base.py) holds one plan of
each kind:

- `SequencePlan`: where image (and text) tokens are sharded and where the output is gathered
  (Ulysses, ring; like diffusers' ``_cp_plan``);
- `TensorPlan`: which linears are split colwise / rowwise (like diffusers' ``_tp_plan``);
- `StagePlan`: how the blocks split into PipeFusion stages, and the small functions that run the
  model's own embedders and head on one patch of image rows (`Grid`, `Patch`);
- `QuantPlan`: which linears fp8 compute quantises.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union

if TYPE_CHECKING:
    import torch

# ---- sequence parallelism -------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Shard tokens at `module` ("" = the denoiser itself) along tensor dim `dim`: the forward
    input named `input`, or the module's output when `input` is None."""

    module: str
    dim: int
    input: str | None = None
    ndim: int | None = None
    """Expected number of dims of the tensor (checked, to catch deprecated layouts)."""
    stream: str = "image"
    """Which tokens: "image" or "text" (joint attention's text tokens, sharded the same way)."""


@dataclass(frozen=True)
class Gather:
    """All-gather the output of `module` along `dim` and drop the padded tokens."""

    module: str
    dim: int


@dataclass(frozen=True)
class SequencePlan:
    """Where a model's tokens are sharded and where its (image) output is gathered. The splits
    of one stream must see the same number of tokens along their dims (e.g. FLUX's packed
    latents and their RoPE ids). Splitting the text too keeps any rank from repeating the text
    stream's work, which would cap the speed-up."""

    splits: tuple[Split, ...]
    gathers: tuple[Gather, ...]
    cross_attention: tuple[str, ...] = ()
    """Patterns (as `TensorPlan`'s) of attention modules whose keys/values are whole on every
    rank (Wan's cross-attention to the text): their queries are this rank's image shard, so they
    attend locally, with no exchange."""

    def is_cross_attention(self, module_name: str) -> bool:
        """Whether the attention module `module_name` is one of `cross_attention`."""
        return any(_matches(pattern, module_name) for pattern in self.cross_attention)


# ---- tensor parallelism ---------------------------------------------------------------------

COLWISE = "colwise"
"""Output features split over ranks; the output stays sharded (feeds attention or a rowwise layer)."""
ROWWISE = "rowwise"
"""Input features split over ranks; partial outputs are summed by one all-reduce. Bias replicated."""
SHARDED_NORM = "sharded_norm"
"""An RMSNorm over the whole width of a colwise output (Wan's q/k norm across heads): its weight is
split like the features and the mean square is summed over the tensor ranks (one small all-reduce)."""
COLWISE_GATHER = "colwise_gather"
"""Output features split over ranks, then all-gathered so every rank has the full output
(for AdaLN modulation: a big weight applied to one vector per sample, whose output indexes the
full hidden width)."""


@dataclass(frozen=True)
class PackedRowwise:
    """Rowwise for a linear whose input is ``cat([a, b, ...], dim=-1)`` of colwise outputs.

    Each rank holds [its columns of a, its columns of b, ...], so the weight's input columns are
    split block by block: block i has the size of the output of sibling module ``parts[i]``
    (a path relative to the linear's parent). FLUX's single-stream ``proj_out`` reads
    ``cat([attn_out, mlp_out])``: ``PackedRowwise(("attn.to_q", "proj_mlp"))``.
    The DTensor's global view of such a weight is in rank order ([a_0, b_0, a_1, b_1, ...]),
    not the checkpoint's; use `local_slice` to compare with an unsharded weight.
    """

    parts: tuple[str, ...]


Style = Union[str, PackedRowwise]


@dataclass(frozen=True, kw_only=True)
class TensorPlan:
    """Which linears of a model family are sharded how; read by `apply` and `load_sharded`.

    Patterns are dotted module names whose components are matched with fnmatch, one component
    per ``*`` ("transformer_blocks.*.attn.to_q"); a pattern may match nothing (variants differ,
    e.g. SD3.5-medium's ``attn2``). Modules no pattern names stay replicated.
    """

    layers: tuple[tuple[str, Style], ...]
    """(module-name pattern, style): style is COLWISE, ROWWISE, COLWISE_GATHER, SHARDED_NORM or a PackedRowwise."""
    attention: tuple[str, ...]
    """Patterns of the attention modules whose ``heads`` attribute becomes the local head count."""

    def resolve(self, model: Any) -> dict[str, Style]:
        """Module name -> style for every module of `model` the plan names."""
        styles: dict[str, Style] = {}
        for name, _ in model.named_modules():
            for pattern, style in self.layers:
                if _matches(pattern, name):
                    styles[name] = style
        return styles

    def attention_modules(self, model: Any) -> dict[str, Any]:
        """Name -> module of every attention module of `model` the plan names."""
        return {
            name: module
            for name, module in model.named_modules()
            if any(_matches(pattern, name) for pattern in self.attention)
        }


def _matches(pattern: str, name: str) -> bool:
    pattern_parts, name_parts = pattern.split("."), name.split(".")
    return len(pattern_parts) == len(name_parts) and all(
        fnmatch.fnmatchcase(part, want) for part, want in zip(name_parts, pattern_parts)
    )


# ---- fp8 compute ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QuantPlan:
    """Which linears fp8 compute quantises (`parallel/quantize.py`); every other module keeps the
    model's dtype: embedders, norms and the final layer are small and sit where rounding costs most."""

    layers: tuple[str, ...]
    """Module-name patterns (as `TensorPlan`'s) of the layers whose weights become fp8; only the
    `nn.Linear` ones among the matches are quantised (a pattern ending in ``*`` may also match norms)."""

    def resolve(self, model: Any) -> list[str]:
        """Names of the modules of `model` the plan names (any type; the caller keeps the linears)."""
        return [name for name, _ in model.named_modules() if any(_matches(pattern, name) for pattern in self.layers)]


# ---- PipeFusion stages ----------------------------------------------------------------------


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
