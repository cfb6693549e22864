"""The single attention entry point: a local backend inside optional Ulysses / ring exchanges.

- `local_attention(q, k, v, backend)`: one process, any registered backend ("sdpa", "math", and
  whatever else is registered with `register_backend`, e.g. "triton").
- `attention(q, k, v, ctx=...)`: the same call on a token shard; with a `SequenceContext` it runs
  Ulysses and/or ring attention over the mesh and handles joint (text + image) attention.
- `SequenceParallelProcessor`: wraps a model's own attention processor (diffusers' FLUX, SD3, ...)
  and routes the processor's `F.scaled_dot_product_attention` call to `attention`, so no model's
  processor math is copied and no diffusers function is patched.

All tensors are (batch, heads, seq, head_dim) ("BHSD"), as SDPA takes them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ditmesh import kernels
from ditmesh.kernels import reference
from ditmesh.parallel import ulysses
from ditmesh.parallel.comm import all_gather, pad_dim
from ditmesh.parallel.ring import ring_attention, ring_group_sizes

# ---- local backends ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A local attention kernel: ``fn(q, k, v, scale)`` -> out, or (out, lse fp32) if `returns_lse`."""

    fn: Callable[..., Any]
    returns_lse: bool
    device_types: tuple[str, ...] | None = None
    """Devices it runs on (None = any)."""


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable[..., Any], *, returns_lse: bool, device_types: tuple[str, ...] | None = None) -> None:
    """Make `name` selectable as ``ParallelConfig.attention_backend``. ``fn(q, k, v, scale)``
    takes BHSD tensors and returns out, or (out, lse fp32) when `returns_lse`."""
    _BACKENDS[name] = Backend(fn, returns_lse, device_types)


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


register_backend("sdpa", _sdpa, returns_lse=False)
register_backend("math", lambda q, k, v, scale: reference.attention_lse(q, k, v, scale), returns_lse=True)
# The Triton flash-attention kernel (forward only; `ditmesh[triton]`), forced for every shape.
register_backend(
    "triton", lambda q, k, v, scale: kernels.select.BACKENDS["triton"](q, k, v, scale), returns_lse=True, device_types=("cuda",)
)
# "auto" where LSE is needed: `ditmesh.kernels.attention_lse` picks the fastest exact kernel for
# the shape and device (cuDNN / Triton / CPU flash; plain torch when differentiating).
_AUTO_LSE = Backend(lambda q, k, v, scale: kernels.attention_lse(q, k, v, scale), returns_lse=True)


def available_backends() -> tuple[str, ...]:
    """Names of the registered local backends."""
    return tuple(_BACKENDS)


def resolve_backend(name: str, *, need_lse: bool, device_type: str = "cpu") -> Backend:
    """The backend `name` ("auto" or registered) resolves to; `ValueError` if it cannot serve
    (unknown, returns no LSE where LSE is needed, or does not run on `device_type`)."""
    if name == "auto":
        return _AUTO_LSE if need_lse else _BACKENDS["sdpa"]
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not registered here; available: {', '.join(('auto',) + available_backends())}")
    backend = _BACKENDS[name]
    if backend.device_types is not None and device_type not in backend.device_types:
        raise ValueError(f"attention backend {name!r} runs on {', '.join(backend.device_types)}, not {device_type}; use 'auto'")
    if need_lse and not backend.returns_lse:
        raise ValueError(
            f"attention backend {name!r} returns no log-sum-exp, which ring attention needs; "
            "use attention_backend='auto' or 'math'"
        )
    return backend


def local_attention(q_BHSD, k_BHSD, v_BHSD, backend: str = "auto", *, scale: float | None = None, return_lse: bool = False):
    """Non-causal attention on this process. Returns out (B,H,Sq,D), or (out, lse (B,H,Sq) fp32)
    with `return_lse` (what merging partial attentions over disjoint key sets needs)."""
    chosen = resolve_backend(backend, need_lse=return_lse, device_type=q_BHSD.device.type)
    result = chosen.fn(q_BHSD, k_BHSD, v_BHSD, scale)
    if chosen.returns_lse and not return_lse:
        return result[0]
    return result


# ---- sequence-parallel attention --------------------------------------------------------------


@dataclass
class SequenceContext:
    """Live state shared by the split hooks and the attention processors of one wrapped model.

    The groups are fixed at `apply`; the token counts are set by the split hooks at the start of
    every forward: image tokens of the whole sequence and per rank (after padding), and the same
    for the text tokens when the model's plan shards them too. `text_len` None means the text is
    whole on every rank (PipeFusion's stages carry it so); attention then shards it itself.
    `head_groups`: Ulysses exchanges and attends a rank's heads in this many pipelined groups.
    """

    sequence_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    joint_text: str | None
    backend: str = "auto"
    head_groups: int = 1
    num_tokens: int | None = None
    local_len: int | None = None
    num_text: int | None = None
    text_len: int | None = None

    @property
    def ulysses_size(self) -> int:
        return dist.get_world_size(self.ulysses_group)

    @property
    def ring_size(self) -> int:
        return dist.get_world_size(self.ring_group)


def attention(q_BHSD, k_BHSD, v_BHSD, *, ctx: SequenceContext | None = None, scale: float | None = None, backend: str = "auto"):
    """Attention of a possibly sharded sequence: the entry point every strategy calls.

    Without `ctx` (or before a forward set it up) this is `local_attention`. With it, the query
    sequence is [text shard, image shard] (joint_text "first"), [image shard, text shard]
    ("last") or the image shard alone, and the result equals attention over the whole sequence
    (for this rank's queries). Where the text is whole on every rank (`ctx.text_len` None) each
    rank attends for its share of the text queries and the text output is all-gathered.
    `backend` is the local kernel without `ctx`; with it, `ctx.backend`.
    """
    if ctx is None or ctx.num_tokens is None:
        return local_attention(q_BHSD, k_BHSD, v_BHSD, backend, scale=scale)
    if _packed_ulysses_fits(q_BHSD, ctx):
        return _packed_ulysses(q_BHSD, k_BHSD, v_BHSD, ctx, scale)
    num_text = q_BHSD.shape[2] - ctx.local_len
    assert num_text >= 0 and k_BHSD.shape[2] == q_BHSD.shape[2], (q_BHSD.shape, k_BHSD.shape, ctx.local_len)
    (qi, qt), (ki, kt), (vi, vt) = (_split_joint(x, num_text, ctx.joint_text) for x in (q_BHSD, k_BHSD, v_BHSD))
    if num_text and ctx.text_len is None:
        out_i, out_t = _replicated_text_attention(qi, ki, vi, qt, kt, vt, ctx, scale)
    else:
        assert num_text in (0, ctx.text_len), (num_text, ctx.text_len)
        out_i, out_t = _sharded_attention(qi, ki, vi, qt, kt, vt, ctx, scale, ctx.num_text if num_text else 0)
    return _join_joint(out_i, out_t, ctx.joint_text)


def _packed_ulysses_fits(q_BHSD: torch.Tensor, ctx: SequenceContext) -> bool:
    """Ulysses alone (no ring), no padding in any stream, heads divisible by U, text sharded (or
    none): the joint tokens can travel as they are (`ulysses.start_packed_exchange`)."""
    degree = ctx.ulysses_size
    num_text = q_BHSD.shape[2] - ctx.local_len
    text_sharded = num_text == 0 or (ctx.text_len == num_text and ctx.num_text == num_text * degree)
    return (degree > 1 and ctx.ring_size == 1 and q_BHSD.shape[1] % degree == 0 and text_sharded
            and ctx.num_tokens == ctx.local_len * degree)


def _packed_ulysses(q_BHSD, k_BHSD, v_BHSD, ctx: SequenceContext, scale):
    """Ulysses over the unpadded joint sequence, in `ctx.head_groups` pipelined groups: one
    packing copy in, one copy out."""
    group = ctx.ulysses_group
    received = _pipelined_head_groups(
        ulysses.head_groups(q_BHSD.shape[1] // ctx.ulysses_size, ctx.head_groups),
        start_in=lambda heads: ulysses.start_packed_exchange(q_BHSD, k_BHSD, v_BHSD, group, heads),
        attend=lambda qkv: local_attention(*qkv, ctx.backend, scale=scale),
        start_out=lambda out: ulysses.start_packed_return(out, group))
    return ulysses.join_packed(received)


def _pipelined_head_groups(groups: list[tuple[int, int]], *, start_in, attend, start_out) -> list[torch.Tensor]:
    """Per head group: start its exchange in, attend what arrives, start the output's return;
    group g+1's exchange is started before group g attends, so it is in flight meanwhile, and
    g's return travels while g+1 attends. Returns the finished returns in group order.

    Every rank starts the exchanges in the same order: in, in, out, in, out, ... (one
    communicator runs its collectives in the order they are started)."""
    incoming = [start_in(groups[0])]
    outgoing = []
    for g in range(len(groups)):
        if g + 1 < len(groups):
            incoming.append(start_in(groups[g + 1]))
        outgoing.append(start_out(attend(incoming[g]())))
    return [finish() for finish in outgoing]


def _replicated_text_attention(qi, ki, vi, qt, kt, vt, ctx: SequenceContext, scale):
    """Text whole on every rank: attend for this rank's share of it, then all-gather the text
    output (small) so every rank holds it whole again."""
    num_text = qt.shape[2]
    qt, kt, vt = (_local_tokens(x, ctx.sequence_group) for x in (qt, kt, vt))
    out_i, out_t = _sharded_attention(qi, ki, vi, qt, kt, vt, ctx, scale, num_text)
    return out_i, all_gather(out_t, dim=2, group=ctx.sequence_group)[:, :, :num_text]


def _sharded_attention(qi, ki, vi, qt, kt, vt, ctx: SequenceContext, scale, num_text: int):
    """This rank's image and text shards (sequence rank s holds tokens [s*len, (s+1)*len) of each,
    the last ones end-padded) -> their outputs, equal to attention over the whole sequence.

    Ulysses turns the token shards into head shards over the ulysses group's tokens (q, k and v
    of both streams in one all-to-all, stacked on the batch dim, which it leaves alone); ring
    attention then runs over the ring ranks' blocks of those."""
    if ctx.ulysses_size == 1:
        return _attend_block(qi, ki, vi, qt, kt, vt, ctx, scale, num_text)
    return _ulysses_in_groups(qi, ki, vi, qt, kt, vt, ctx, scale, num_text)


def _ulysses_in_groups(qi, ki, vi, qt, kt, vt, ctx: SequenceContext, scale, num_text: int):
    """Ulysses with a rank's heads in `ctx.head_groups` pipelined groups (heads attend
    independently, so the result equals one exchange of all heads)."""
    num_heads, lengths, group = qi.shape[1], [qi.shape[2], qt.shape[2]], ctx.ulysses_group
    streams = [torch.cat([qi, ki, vi]), torch.cat([qt, kt, vt])]

    def attend(image_text):
        (qi_, ki_, vi_), (qt_, kt_, vt_) = (x.chunk(3) for x in image_text)
        return _attend_block(qi_, ki_, vi_, qt_, kt_, vt_, ctx, scale, num_text)

    received = _pipelined_head_groups(
        ulysses.head_groups(ulysses.padded_heads(num_heads, ctx.ulysses_size) // ctx.ulysses_size, ctx.head_groups),
        start_in=lambda heads: ulysses.start_heads_to_sequence(streams, group, heads),
        attend=attend,
        start_out=lambda outs: ulysses.start_sequence_to_heads(list(outs), group))
    return ulysses.join_head_groups(received, lengths, num_heads)


def _attend_block(qi, ki, vi, qt, kt, vt, ctx: SequenceContext, scale, num_text: int):
    """Queries of this ring rank's block ([text, image] tokens of its ulysses group) over the
    keys of every ring rank's block, padding excluded."""
    text_block, image_block = qt.shape[2], qi.shape[2]
    # Padding sits at the end of each stream: ring block r holds tokens [r*block, (r+1)*block).
    valid_t = [min(max(num_text - r * text_block, 0), text_block) for r in range(ctx.ring_size)]
    valid_i = [min(max(ctx.num_tokens - r * image_block, 0), image_block) for r in range(ctx.ring_size)]
    rank = dist.get_rank(ctx.ring_group)
    q = torch.cat([qt, qi], dim=2)
    # Keys: this block's real tokens first, its padding last (key order does not matter).
    k, v = (_valid_first(text, image, valid_t[rank], valid_i[rank]) for text, image in ((kt, ki), (vt, vi)))
    if ctx.ring_size == 1:
        num_valid = valid_t[0] + valid_i[0]
        out = local_attention(q, k[:, :, :num_valid], v[:, :, :num_valid], ctx.backend, scale=scale)
    else:
        out = _ring(q, k, v, [t + i for t, i in zip(valid_t, valid_i)], ctx, scale)
    return out[:, :, text_block:], out[:, :, :text_block]


def _valid_first(text_BHSD, image_BHSD, num_text: int, num_image: int) -> torch.Tensor:
    """[text, image] with the real tokens of both first and the padding of both last."""
    if num_text == text_BHSD.shape[2]:  # no text padding: [text, image] already is
        return torch.cat([text_BHSD, image_BHSD], dim=2)
    parts = (text_BHSD[:, :, :num_text], image_BHSD[:, :, :num_image], text_BHSD[:, :, num_text:], image_BHSD[:, :, num_image:])
    return torch.cat(parts, dim=2)


def _ring(q, k, v, valid: list[int], ctx: SequenceContext, scale):
    def attend(q_, k_, v_):
        return local_attention(q_, k_, v_, ctx.backend, scale=scale, return_lse=True)

    def step(q_, k_, v_, prev_out, prev_lse):
        return kernels.attention_merge_lse(q_, k_, v_, prev_out, prev_lse, scale)

    fused = step if ctx.backend == "auto" else None  # other backends: attend, then merge
    sizes = ring_group_sizes(q, k, ctx.ring_size)
    out, _ = ring_attention(q, k, v, ctx.ring_group, attend, valid_keys=valid, step=fused, group_sizes=sizes)
    return out


def _local_tokens(x_BHSD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's share of a replicated sequence (padded to a multiple of the group size)."""
    world = dist.get_world_size(group)
    share = -(-x_BHSD.shape[2] // world)
    return pad_dim(x_BHSD, 2, share * world).narrow(2, dist.get_rank(group) * share, share)


def _split_joint(x_BHSD: torch.Tensor, num_text: int, joint_text: str | None):
    """-> (image part, text part) of a joint sequence."""
    num_image = x_BHSD.shape[2] - num_text
    if joint_text == "first":
        text, image = x_BHSD.split([num_text, num_image], dim=2)
    elif joint_text == "last" or num_text == 0:
        image, text = x_BHSD.split([num_image, num_text], dim=2)
    else:
        raise ValueError(f"the model's adapter must say where text tokens sit (joint_text 'first' or 'last'), got {joint_text!r}")
    return image, text


def _join_joint(image: torch.Tensor, text: torch.Tensor, joint_text: str | None) -> torch.Tensor:
    if text.shape[2] == 0:
        return image
    return torch.cat([text, image] if joint_text == "first" else [image, text], dim=2)


# ---- routing a model's own processor through `attention` -----------------------------------


def _sdpa_to_attention(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or is_causal or dropout_p != 0.0:
        raise ValueError(
            "sequence-parallel attention supports unmasked, non-causal attention without dropout; "
            "call the pipeline without attention masks (e.g. no padded-prompt masks) or use ulysses/ring degree 1"
        )
    if key.shape[1] != query.shape[1]:
        raise ValueError("sequence-parallel attention needs as many key heads as query heads (no grouped-query attention)")
    return attention(query, key, value, ctx=ctx, scale=scale, backend=ctx.backend)


class RedirectSDPA(TorchFunctionMode):
    """While active, `F.scaled_dot_product_attention` calls go to ``fn(sdpa, *args, **kwargs)``;
    every other torch function runs unchanged. Strategies enter it only inside one attention
    processor call. The mode is off inside its own handler (no recursion); a mode entered after
    it handles the call first."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.fn(func, *args, **kwargs)
        name = getattr(func, "__name__", None)
        if _PYTHON_TENSOR_METHODS.get(name) is func:
            # Same call, as a method: torch.compile cannot trace these Python-level Tensor methods
            # when a mode hands them over as functions (their `super()` call), but traces methods.
            return getattr(args[0], name)(*args[1:], **kwargs)
        return func(*args, **kwargs)


# Tensor methods written in Python (unflatten, split, ...), by name.
_PYTHON_TENSOR_METHODS = {name: func for name, func in vars(torch.Tensor).items() if inspect.isfunction(func)}


def _sdpa_to_cross_attention(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # Cross-attention: the queries are this rank's image shard, the keys/values (text, or an
    # image prompt) are whole on every rank, so local attention is exact with no exchange.
    if attn_mask is not None or is_causal or dropout_p != 0.0:
        raise ValueError("sequence-parallel cross-attention supports unmasked, non-causal attention without dropout")
    return local_attention(query, key, value, ctx.backend, scale=scale)


class SequenceParallelProcessor:
    """An attention processor that runs the model's original processor with its SDPA call
    replaced by ditmesh's sequence-parallel `attention` (or, for a `cross` attention whose
    keys/values are whole on every rank, by local attention of this rank's queries).
    Install with ``set_attn_processor``."""

    def __init__(self, inner: Any, ctx: SequenceContext, cross: bool = False):
        self.inner = inner
        self.ctx = ctx
        self.cross = cross

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        to = _sdpa_to_cross_attention if self.cross else _sdpa_to_attention
        route = RedirectSDPA(lambda _sdpa, *a, **k: to(self.ctx, *a, **k))
        with route:
            out = self.inner(attn, *args, **kwargs)
        if route.calls == 0 and self.ctx.num_tokens is not None:
            # Attention ran without SDPA, on this rank's shard only: the result would be wrong.
            raise ValueError(
                f"{type(self.inner).__name__} computed attention without torch SDPA (a non-native attention "
                "backend?); call transformer.set_attention_backend('native') before ditmesh.parallelize"
            )
        return out
