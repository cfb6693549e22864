"""Parallel VAE decode and encode: each image's rows split over the ranks that share it.

The ranks that work on one image (every mesh axis but data: cfg x pipefusion x ring x ulysses x
tensor, `image_mesh`) each decode a band of the latent's rows and all-gather the image rows, so
every rank returns the same image as the serial decode (rank 0's is what the pipeline returns).
Encode is split the same way (img2img, training data), the image cut at multiples of the VAE's
down-scaling so every resolution's band starts on an even row.

Nothing of diffusers' VAE is copied; its modules are wrapped where rows meet:

- a 3x3 convolution (any stride-1 ``2p+1``-row kernel) runs on its own rows as usual, zero padding
  at both ends, while the p edge rows travel to and from the neighbouring ranks; then the p output
  rows next to each neighbour are recomputed from a strip that includes the neighbour's rows. The
  exchange overlaps the convolution and no band-sized copy is made;
- the encoder's ``Downsample2D`` (zero-pad one row and column, 3x3 stride 2) appends the next
  rank's first row before its pad, the one row its last output reads from beyond the band;
- GroupNorm reduces its statistics over the ranks (each rank's fp32 count, mean and variance,
  all-gathered and combined exactly), then normalises with them in one `batch_norm` kernel;
- the mid-block attention is exact: its keys and values (`to_k`, `to_v` outputs) are
  all-gathered, so each rank's queries see every token;
- nearest up-sampling, 1x1 convolutions, activations and the residual adds are row-local.

Video VAEs built of causal 3-D convolutions (diffusers' `AutoencoderKLWan`: Wan 2.1 / 2.2) decode
split the same way, frame chunk by frame chunk as the VAE's own loop calls its decoder
(`install_video`): each rank keeps its rows of every frame, its per-frame feature cache holds only
its rows, and a 3-D convolution exchanges the edge rows of the cached and the new frames together.
Its norm (`WanRMS_norm`) normalises over channels at each position, so it is row-local and needs no
statistics from other ranks; the mid-block's single-head attention (per frame, at latent
resolution) all-gathers its keys and values. The encoder stays serial (image-to-video encodes one
frame).

Bands may differ by a row (`data.shard`), so any latent height of at least one row per rank
works. Tiling (`vae.enable_tiling()`) composes: every tile the VAE decodes is split over the ranks,
so the result equals the serial tiled decode and memory drops by both factors. The split runs
only in inference (autograd off) and for latents of at least `MIN_LATENT_PIXELS` (below it the
exchanges cost more than the work saved); otherwise every rank runs the module as it is.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ditmesh.config import AXES
from ditmesh.parallel.comm import all_gather
from ditmesh.parallel.data import shard
from ditmesh.parallel.mesh import ParallelMesh

IMAGE_AXES = tuple(axis for axis in AXES if axis != "data")
"""The axes whose ranks work on the same image (and the same prompt)."""

MIN_LATENT_PIXELS = 128 * 128
"""Smallest latent (height x width) the VAE splits over ranks: 1024 x 1024 images for an 8x VAE,
the smallest size measured to pay at every W (FLUX VAE on an H200: one rank of 2 / 4 / 8 takes
65 / 39 / 39 ms against 87 ms serial, before ~2 ms of transfers; benchmarks/results/vae_h200.md)."""

# diffusers VAE blocks whose own forward only chains their children and row-local tensor ops
# (adds, scales, reshapes): splitting them is splitting their children.
ROW_LOCAL_BLOCKS = ("Encoder", "Decoder", "UNetMidBlock2D", "ResnetBlock2D", "UpDecoderBlock2D",
                    "DownEncoderBlock2D", "ModuleList", "Attention", "Upsample2D", "Downsample2D")
# Leaves that act on each row (each token) alone.
ROW_LOCAL_LEAVES = (nn.SiLU, nn.Dropout, nn.Identity, nn.Linear)
ATTENTION_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")  # compute K/V with to_k / to_v of the input


def image_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """The ranks that share an image (every axis but data) as one flattened mesh axis.

    Creating it is collective the first time on a mesh (it builds the group): every rank calls it
    at the same point (`parallelize` does); later calls return the same mesh."""
    return mesh.device_mesh[IMAGE_AXES]._flatten("image")


def apply(pipe: Any, mesh: ParallelMesh, adapter: Any) -> RowSplit | None:
    """Split the VAE of `pipe` (the adapter's `vae_attr`) over the ranks that share an image."""
    vae = getattr(pipe, adapter.vae_attr, None) if adapter.vae_attr else None
    group = image_mesh(mesh).get_group()
    if vae is None or dist.get_world_size(group) == 1:
        return None
    return install(vae, group)


def install(vae: nn.Module, group: dist.ProcessGroup, min_latent_pixels: int | None = None) -> RowSplit | None:
    """Make `vae` (a diffusers `AutoencoderKL`) decode and encode split by rows over `group`; a
    causal video VAE (`AutoencoderKLWan`) decodes split (`install_video`).

    Every rank of `group` must call the VAE with the same latent (image) shapes. Returns the
    shared `RowSplit` (None, with a warning, when the VAE holds a module this file cannot split:
    it then stays serial). Installing again on the same VAE only changes the group and threshold.
    `min_latent_pixels` None: `MIN_LATENT_PIXELS` (`MIN_VIDEO_LATENT_PIXELS` for a video VAE).
    """
    video = _is_causal_video(vae)
    if min_latent_pixels is None:
        min_latent_pixels = MIN_VIDEO_LATENT_PIXELS if video else MIN_LATENT_PIXELS
    split = row_split(vae)
    if split is not None:
        split.set_group(group)
        split.min_latent_pixels = min_latent_pixels
        return split
    if video:
        return install_video(vae, group, min_latent_pixels)
    parts = [getattr(vae, name, None) for name in ("encoder", "decoder")]
    problems = [problem for part in parts if part is not None for problem in _unsupported(part)]
    if problems or all(part is None for part in parts):
        warnings.warn(f"the VAE stays serial: {'; '.join(problems) or 'no encoder or decoder'}", stacklevel=2)
        return None
    split = RowSplit(group, min_latent_pixels)
    encoder, decoder = parts
    if encoder is not None:  # image rows per latent row: the bands' unit when encoding
        split.unit = 2 ** sum(type(module).__name__ == "Downsample2D" for module in encoder.modules())
    for part, cut in ((encoder, split.split_image), (decoder, split.split_latent)):
        if part is not None:
            _wrap(part, split)
            part.register_forward_pre_hook(cut, with_kwargs=True)
            part.register_forward_hook(split.gather_rows, always_call=True)
    vae._ditmesh_row_split = split
    return split


def row_split(vae: nn.Module) -> RowSplit | None:
    """The split `install` gave `vae` (None if none): set its `min_latent_pixels` to change
    which latents split (0: all that have a row per rank)."""
    return getattr(vae, "_ditmesh_row_split", None)


class RowSplit:
    """What the wrapped modules of one VAE share: the group, and during a split call the number
    of latent rows on each rank (None when the call runs whole)."""

    def __init__(self, group: dist.ProcessGroup, min_latent_pixels: int):
        self.set_group(group)
        self.min_latent_pixels = min_latent_pixels
        self.unit = 1  # image rows per latent row for encode (2 ** number of down-samplers)
        self.latent_rows: list[int] | None = None

    def set_group(self, group: dist.ProcessGroup) -> None:
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)

    @property
    def active(self) -> bool:
        return self.latent_rows is not None

    def plan(self, latent_height: int, latent_width: int) -> list[int] | None:
        """Latent rows per rank, or None to run whole (every rank decides alike from the shape)."""
        if (torch.is_grad_enabled() or self.world == 1 or latent_height < self.world
                or latent_height * latent_width < self.min_latent_pixels):
            return None
        return [stop - start for start, stop in (shard(latent_height, self.world, r) for r in range(self.world))]

    # ---- hooks on the decoder / encoder: cut the input, gather the output ------------------

    def split_latent(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Decoder pre-hook: keep this rank's band of latent rows (B, C, h, w) -> (B, C, h_r, w)."""
        return self._cut(args, kwargs, unit=1)

    def split_image(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Encoder pre-hook: keep this rank's band of image rows, whole latent rows of it."""
        return self._cut(args, kwargs, unit=self.unit)

    def _cut(self, args: tuple, kwargs: dict, unit: int) -> Any:
        x = args[0] if args else kwargs["sample"]
        if x.shape[-2] % unit:  # an image whose rows do not make whole latent rows runs whole
            return None
        rows = self.plan(x.shape[-2] // unit, x.shape[-1] // unit)
        if rows is None:
            return None
        self.latent_rows = rows
        start = sum(rows[: self.rank]) * unit
        band = x[..., start : start + rows[self.rank] * unit, :]
        return ((band, *args[1:]), kwargs) if args else (args, {**kwargs, "sample": band})

    def gather_rows(self, module: nn.Module, args: tuple, output: torch.Tensor | None) -> torch.Tensor | None:
        """Decoder / encoder hook (also run on an exception, to leave the split state clean):
        every rank's rows of the output, in order."""
        rows, self.latent_rows = self.latent_rows, None
        if rows is None or output is None:  # not split, or raising: no collective
            return None
        scale = output.shape[-2] // rows[self.rank]  # output rows per latent row (8 decoding, 1 encoding)
        return gather_rows(output, -2, [r * scale for r in rows], self.group)

    # ---- the exchanges the wrapped modules make ------------------------------------------

    def start_halo(self, x: torch.Tensor, p: int) -> Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Post the exchange of `p` edge rows with both neighbours; returns ``finish()`` ->
        (previous rank's last p rows, next rank's first p rows), None at the image's edges.

        Every rank runs the same wrapped modules in the same order, so the batches pair up; the
        edge rows of all ranks have one shape (B, C, p, W)."""
        ops, top, bottom = [], None, None
        if self.rank > 0:
            top = x.new_empty(x[..., :p, :].shape)
            ops += [dist.P2POp(dist.isend, x[..., :p, :].contiguous(), group=self.group, group_peer=self.rank - 1),
                    dist.P2POp(dist.irecv, top, group=self.group, group_peer=self.rank - 1)]
        if self.rank < self.world - 1:
            bottom = x.new_empty(x[..., -p:, :].shape)
            ops += [dist.P2POp(dist.isend, x[..., -p:, :].contiguous(), group=self.group, group_peer=self.rank + 1),
                    dist.P2POp(dist.irecv, bottom, group=self.group, group_peer=self.rank + 1)]
        works = dist.batch_isend_irecv(ops)

        def finish() -> tuple[torch.Tensor | None, torch.Tensor | None]:
            for work in works:
                work.wait()  # NCCL: the compute stream waits, the host does not
            return top, bottom

        return finish

    def next_rows(self, x: torch.Tensor, p: int) -> torch.Tensor | None:
        """The next rank's first `p` rows (None on the last rank); sends ours to the previous."""
        ops, bottom = [], None
        if self.rank > 0:
            ops.append(dist.P2POp(dist.isend, x[..., :p, :].contiguous(), group=self.group, group_peer=self.rank - 1))
        if self.rank < self.world - 1:
            bottom = x.new_empty(x[..., :p, :].shape)
            ops.append(dist.P2POp(dist.irecv, bottom, group=self.group, group_peer=self.rank + 1))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return bottom

    def combine_moments(self, count: int, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance over every rank's rows from each rank's own, fp32 (B, G).

        Chan's pairwise formula, all ranks at once: no sum-of-squares cancellation."""
        local = torch.stack([torch.full_like(mean, count), mean, var], dim=-1)  # (B, G, 3)
        counts, means, variances = all_gather(local[None], 0, self.group).unbind(-1)  # (W, B, G) each
        total = counts.sum(0)
        mean_all = (counts * means).sum(0) / total
        var_all = (counts * (variances + (means - mean_all) ** 2)).sum(0) / total
        return mean_all, var_all


def gather_rows(x: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's `x` (sizes[r] entries along `dim` on rank r) concatenated along `dim` in rank
    order. Uneven sizes travel padded to the largest and are cut back."""
    dim = dim % x.ndim
    longest = max(sizes)
    if x.shape[dim] < longest:
        pad = list(x.shape)
        pad[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    chunks = all_gather(x, 0, group).chunk(len(sizes))  # rank r's padded x
    return torch.cat([chunk.narrow(dim, 0, size) for chunk, size in zip(chunks, sizes)], dim=dim)


# ---- the wrapped modules ------------------------------------------------------------------


class RowConv2d(nn.Conv2d):
    """An `nn.Conv2d` (stride 1, 2p+1 kernel rows, p padding rows) that, during a split call,
    uses its neighbours' p edge rows where the serial conv would see them."""

    _row_split: RowSplit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self._row_split
        if not split.active:
            return super().forward(x)
        p = self.padding[0]
        finish = split.start_halo(x, p)
        if x.shape[-2] < 2 * p:  # too few rows for two edge strips: convolve band and halos at once
            top, bottom = finish()
            return self._rows(torch.cat([_or_zeros(top, x, p), x, _or_zeros(bottom, x, p)], dim=-2))
        out = super().forward(x)  # exact but for the p rows next to each neighbour (zero-padded here)
        top, bottom = finish()
        if top is not None:
            out[..., :p, :] = self._rows(torch.cat([top, x[..., : 2 * p, :]], dim=-2))
        if bottom is not None:
            out[..., -p:, :] = self._rows(torch.cat([x[..., -2 * p :, :], bottom], dim=-2))
        return out

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The conv without row padding: a strip of n rows gives n - 2p output rows."""
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, self.padding[1]), self.dilation, self.groups)


class RowGroupNorm(nn.GroupNorm):
    """An `nn.GroupNorm` whose statistics, during a split call, cover every rank's rows."""

    _row_split: RowSplit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self._row_split
        if not split.active:
            return super().forward(x)
        batch, channels, groups = x.shape[0], x.shape[1], self.num_groups
        grouped = x.reshape(batch, groups, -1)  # (B, G, channels/G x this rank's positions)
        mean, var = split.combine_moments(grouped.shape[-1], *_moments(grouped))
        per_channel = lambda t: t.repeat_interleave(channels // groups, dim=1).reshape(-1)  # (B*C,)
        weight = self.weight.float().repeat(batch) if self.weight is not None else None
        bias = self.bias.float().repeat(batch) if self.bias is not None else None
        # batch_norm in eval mode normalises by given statistics: per (sample, channel) here,
        # fp32 statistics and affine over x's dtype in one kernel, as group_norm does.
        out = F.batch_norm(x.reshape(1, batch * channels, -1), per_channel(mean), per_channel(var),
                           weight, bias, False, 0.0, self.eps)
        return out.reshape(x.shape)


def _moments(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 mean and biased variance over the last dim of (B, G, n)."""
    if grouped.is_cuda:  # SyncBatchNorm's Welford kernel: fp32 statistics, no fp32 copy of x
        mean, invstd = torch.batch_norm_stats(grouped.reshape(1, -1, grouped.shape[-1]), 0.0)
        return mean.view(grouped.shape[:2]), invstd.pow(-2).view(grouped.shape[:2])  # 1/inf -> var 0
    var, mean = torch.var_mean(grouped.float(), dim=-1, correction=0)
    return mean, var


def _or_zeros(rows: torch.Tensor | None, x: torch.Tensor, p: int) -> torch.Tensor:
    return rows if rows is not None else x.new_zeros(x[..., :p, :].shape)


def _gather_tokens(split: RowSplit) -> Callable:
    """Forward hook for the mid-block attention's `to_k` / `to_v`: every rank's tokens (B, T, C),
    so the local queries attend to the whole latent (it runs at latent resolution)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not split.active:
            return None
        per_row = output.shape[1] // split.latent_rows[split.rank]  # tokens per latent row (its width)
        return gather_rows(output, 1, [rows * per_row for rows in split.latent_rows], split.group)

    return hook


def _append_next_row(split: RowSplit) -> Callable:
    """Forward pre-hook for the encoder's `Downsample2D` (pad one zero row, 3x3 conv, stride 2):
    its last output row reads one row past the band, the next rank's first (the pad's zeros on
    the last rank, where the image ends)."""

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not split.active:
            return None
        below = split.next_rows(args[0], 1)
        return None if below is None else (torch.cat([args[0], below], dim=-2), *args[1:])

    return hook


def _unsupported(part: nn.Module) -> list[str]:
    """Why `part` (an encoder or decoder) cannot be split by rows: [] when it can."""
    problems = []
    for name, module in part.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Conv2d) and type(module) in (nn.Conv2d, RowConv2d):
            if not (_is_halo_conv(module) or _is_pointwise(module) or _in_downsampler(part, name)):
                problems.append(f"{name}: conv {module}")
        elif type(module) in (nn.GroupNorm, RowGroupNorm):
            pass
        elif kind == "Downsample2D":
            if not (module.use_conv and module.padding == 0 and module.norm is None and module.conv.stride == (2, 2)
                    and module.conv.kernel_size == (3, 3)):
                problems.append(f"{name}: Downsample2D other than pad + 3x3 stride 2")
        elif kind == "Upsample2D":
            if module.use_conv_transpose or not module.interpolate or module.norm is not None:
                problems.append(f"{name}: Upsample2D other than nearest x2")
        elif kind == "Attention":
            if (type(module.processor).__name__ not in ATTENTION_PROCESSORS or module.is_cross_attention
                    or getattr(module, "fused_projections", False) or module.spatial_norm is not None):
                problems.append(f"{name}: attention with {type(module.processor).__name__}")
        elif kind not in ROW_LOCAL_BLOCKS and not isinstance(module, ROW_LOCAL_LEAVES):
            problems.append(f"{name}: {kind}")
    return problems


def _is_halo_conv(conv: nn.Conv2d) -> bool:
    k, p = conv.kernel_size[0], conv.padding
    return (isinstance(p, tuple) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and k == 2 * p[0] + 1 and p[0] > 0 and conv.padding_mode == "zeros")


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), 0)


def _in_downsampler(part: nn.Module, name: str) -> bool:
    parent = part.get_submodule(name.rpartition(".")[0]) if "." in name else part
    return type(parent).__name__ == "Downsample2D"


def _wrap(part: nn.Module, split: RowSplit) -> None:
    """Give `part`'s modules their split behaviour (class swaps as `torch.nn.utils.parametrize`
    does: same parameters and state-dict keys, another forward; hooks elsewhere)."""
    for name, module in part.named_modules():
        if type(module) is nn.Conv2d and _is_halo_conv(module):
            module.__class__ = RowConv2d
        elif type(module) is nn.GroupNorm:
            module.__class__ = RowGroupNorm
        elif type(module).__name__ == "Downsample2D":
            module.register_forward_pre_hook(_append_next_row(split))
        elif type(module).__name__ == "Attention":
            module.to_k.register_forward_hook(_gather_tokens(split))
            module.to_v.register_forward_hook(_gather_tokens(split))
        if isinstance(module, (RowConv2d, RowGroupNorm)):
            module._row_split = split


# ---- video VAEs: causal 3-D convolutions with a per-frame feature cache (Wan) ----------------

MIN_VIDEO_LATENT_PIXELS = 32 * 32
"""Smallest latent frame (height x width) a video VAE splits: each decoder call decodes one latent
frame into four video frames, several times an image's work per latent pixel (Wan at 480p:
60 x 104 latents per frame, 21 calls). A guess, not measured yet (`benchmarks/video.py --vae`)."""

# Wan decoder modules whose forward only chains its children and position-wise ops (channel
# RMS norm, nearest up-sampling, reshapes between frames and channels, adds, the clamp).
VIDEO_ROW_LOCAL = ("WanDecoder3d", "WanMidBlock", "WanUpBlock", "WanResidualBlock", "WanResample", "WanRMS_norm",
                   "WanUpsample", "ModuleList", "Sequential")


def install_video(vae: nn.Module, group: dist.ProcessGroup, min_latent_pixels: int = MIN_VIDEO_LATENT_PIXELS) -> RowSplit | None:
    """Make a causal video VAE's decoder (`AutoencoderKLWan`) decode split by rows over `group`;
    its encoder stays serial. Every rank must decode the same latent shapes. None, with a
    warning, when the decoder holds a module this file cannot split."""
    decoder = getattr(vae, "decoder", None)
    problems = _video_unsupported(decoder) if decoder is not None else ["no decoder"]
    if problems:
        warnings.warn(f"the VAE stays serial: {'; '.join(problems)}", stacklevel=3)
        return None
    split = RowSplit(group, min_latent_pixels)
    for module in decoder.modules():
        swap = _video_swap(module)
        if swap is not None:
            module.__class__ = swap
            module._row_split = split
    # The VAE's loop calls the decoder once per latent frame (B, C, 1, h, w): each call is cut to
    # this rank's rows and its video frames (B, 3, 1 or 4, 8h, 8w) gathered whole.
    decoder.register_forward_pre_hook(split.split_latent, with_kwargs=True)
    decoder.register_forward_hook(split.gather_rows, always_call=True)
    vae._ditmesh_row_split = split
    return split


def _is_causal_video(vae: nn.Module) -> bool:
    """Whether `vae`'s decoder is built of causal 3-D convolutions (a feature-cached video VAE)."""
    decoder = getattr(vae, "decoder", None)
    return decoder is not None and any(isinstance(m, nn.Conv3d) and hasattr(m, "_padding") for m in decoder.modules())


class RowCausalConv3d(nn.Conv3d):
    """Mixin forward for Wan's `WanCausalConv3d` (``_padding``: (w, w, h, h, 2 t, 0), applied by
    its forward with the cached frames prepended): during a split call the h padding rows are the
    neighbours' edge rows of the cached and the new frames (zeros at the video's top and bottom)."""

    _row_split: RowSplit
    _padding: tuple[int, ...]

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        split, p = self._row_split, self._padding[2]
        if not split.active or p == 0:
            return super().forward(x, cache_x)
        padding = list(self._padding)
        if cache_x is not None and padding[4] > 0:  # the frames the causal kernel reads before x
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        top, bottom = split.start_halo(x, p)()  # (B, C, T, p, W) each, None at the video's edges
        x = torch.cat([_or_zeros(top, x, p), x, _or_zeros(bottom, x, p)], dim=-2)
        padding[2] = padding[3] = 0
        return F.conv3d(F.pad(x, padding), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class RowVideoAttention(nn.Module):
    """Mixin forward for Wan's mid-block `WanAttentionBlock` (one head over each frame's h x w
    tokens, q/k/v from a 1x1 conv): during a split call the keys and values of every rank's rows
    are all-gathered, so the local queries see the whole frame."""

    _row_split: RowSplit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self._row_split
        if not split.active:
            return super().forward(x)
        batch, channels, frames, height, width = x.shape
        frames_x = self.norm(x.transpose(1, 2).reshape(batch * frames, channels, height, width))
        qkv = self.to_qkv(frames_x).flatten(2).transpose(1, 2)[:, None]  # (B*T, 1, h*w, 3C), tokens row-major
        q, k, v = qkv.chunk(3, dim=-1)
        scale = height // split.latent_rows[split.rank]  # rows here per latent row (1: it runs at latent size)
        sizes = [rows * scale * width for rows in split.latent_rows]
        k, v = (gather_rows(t.contiguous(), 2, sizes, split.group) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, h*w, C)
        out = self.proj(out[:, 0].transpose(1, 2).reshape(batch * frames, channels, height, width))
        return out.view(batch, frames, channels, height, width).transpose(1, 2) + x


_VIDEO_SWAPS: dict[type, type] = {}


def _video_swap(module: nn.Module) -> type | None:
    """The class `module` becomes for a split video decode (its own class with a row-split
    forward mixed in; same parameters and state-dict keys), or None where it stays."""
    kind = type(module)
    if kind.__name__ == "WanCausalConv3d":
        mixin = RowCausalConv3d
    elif kind.__name__ == "WanAttentionBlock":
        mixin = RowVideoAttention
    elif kind is nn.Conv2d and _is_halo_conv(module):  # the up-samplers' per-frame 3x3 conv
        return RowConv2d
    else:
        return None
    if kind not in _VIDEO_SWAPS:
        _VIDEO_SWAPS[kind] = type(f"Row{kind.__name__}", (mixin, kind), {})
    return _VIDEO_SWAPS[kind]


def _video_unsupported(decoder: nn.Module) -> list[str]:
    """Why a video decoder cannot be split by rows: [] when it can."""
    problems = []
    for name, module in decoder.named_modules():
        kind = type(module).__name__
        if kind == "WanCausalConv3d":
            if module.stride != (1, 1, 1) or module.dilation != (1, 1, 1) or module._padding[2] * 2 + 1 != module.kernel_size[1]:
                problems.append(f"{name}: causal conv {module}")
        elif kind == "WanResample":
            if module.mode not in ("upsample2d", "upsample3d"):
                problems.append(f"{name}: WanResample {module.mode}")
        elif isinstance(module, nn.Conv2d):
            if not (_is_halo_conv(module) or _is_pointwise(module)):
                problems.append(f"{name}: conv {module}")
        elif kind not in VIDEO_ROW_LOCAL + ("WanAttentionBlock",) and not isinstance(module, ROW_LOCAL_LEAVES):
            problems.append(f"{name}: {kind}")
    return problems
