"""`ParallelConfig`: which strategies run, at which degree, with which settings.

A config is plain frozen data: it knows nothing about torch.distributed. The mesh
(`ditmesh.parallel.mesh.ParallelMesh`) turns it into process groups; live state never sits here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Mesh axes, outer -> inner. The axes that talk most (tensor, ulysses) sit innermost so their
# groups are neighbouring ranks (same host, fastest links).
AXES = ("data", "cfg", "pipefusion", "ring", "ulysses", "tensor")

ATTENTION_BACKENDS = ("auto", "sdpa", "math", "triton")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Degrees of each parallel strategy (1 = off) and their settings.

    The product of the degrees is the world size: one process per GPU. Build one directly,
    or from the string form the CLI takes: ``ParallelConfig.parse("ulysses=4,cfg=2")``.
    """

    data_degree: int = 1
    """Independent replicas; a batch of prompts/images is split across them."""
    cfg_degree: int = 1
    """2 runs the conditional and unconditional branches of classifier-free guidance on different ranks."""
    pipefusion_degree: int = 1
    """Pipeline stages: the transformer's blocks split over ranks, image patches flowing through."""
    ring_degree: int = 1
    """Ring attention: image tokens sharded, key/value blocks passed round a ring."""
    ulysses_degree: int = 1
    """Ulysses sequence parallelism: image tokens sharded, all-to-all to split heads for attention."""
    tensor_degree: int = 1
    """Megatron-style tensor parallelism: attention heads and MLP width split over ranks."""

    pipefusion_patches: int | None = None
    """Patches the image is split into for PipeFusion (None = pipefusion_degree)."""
    warmup_steps: int = 1
    """PipeFusion: first diffusion steps run exactly (no stale activations) to fill the buffers."""
    attention_backend: str = "auto"
    """Local attention kernel: auto (fastest available), sdpa, math (plain torch, returns LSE) or triton."""
    ulysses_head_groups: int = 1
    """Ulysses: a rank's heads are exchanged and attended in this many groups, pipelined, so one
    group's all-to-all overlaps another group's attention (1 = one all-to-all each way; capped at
    the heads per rank). Outputs are the same for every value. Compiled blocks get
    `reorder_comms` with it (without, inductor's schedule serialises the groups)."""
    reorder_comms: bool = False
    """Compiled blocks under sequence parallelism: inductor moves compute that does not need an
    exchange between the exchange's start and its wait (FLUX's single blocks: the MLP runs while
    the attention output travels back). Scheduling only: outputs are the same."""

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, f"{axis}_degree")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{axis}_degree must be a positive integer (1 = off), got {value!r}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(
                f"cfg_degree must be 1 or 2 (one rank per guidance branch), got {self.cfg_degree}; "
                "use data_degree to spread more ranks"
            )
        if self.pipefusion_patches is not None and (
            not isinstance(self.pipefusion_patches, int) or self.pipefusion_patches < 1
        ):
            raise ValueError(f"pipefusion_patches must be a positive integer, got {self.pipefusion_patches!r}")
        if not isinstance(self.ulysses_head_groups, int) or isinstance(self.ulysses_head_groups, bool) or self.ulysses_head_groups < 1:
            raise ValueError(f"ulysses_head_groups must be a positive integer (1 = all heads in one exchange), got {self.ulysses_head_groups!r}")
        if not isinstance(self.reorder_comms, bool):
            raise ValueError(f"reorder_comms must be True or False (1 or 0 in the string form), got {self.reorder_comms!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend {self.attention_backend!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}"
            )

    @property
    def degrees(self) -> dict[str, int]:
        """Degree of each mesh axis, outer -> inner."""
        return {axis: getattr(self, f"{axis}_degree") for axis in AXES}

    @property
    def world_size(self) -> int:
        """Number of processes (GPUs) this config needs: the product of the degrees."""
        return math.prod(self.degrees.values())

    @property
    def sequence_degree(self) -> int:
        """Ranks a sequence is sharded over: ring x ulysses."""
        return self.ring_degree * self.ulysses_degree

    @property
    def num_patches(self) -> int:
        """Patches PipeFusion splits the image into."""
        return self.pipefusion_patches or self.pipefusion_degree

    def check_world_size(self, world_size: int) -> None:
        """Raise `ValueError` unless this config fills exactly `world_size` processes."""
        if world_size != self.world_size:
            raise ValueError(
                f"parallel config {self} needs {self.world_size} processes but the world has {world_size}; "
                f"launch {self.world_size} processes or change the degrees so their product is {world_size}"
            )

    # ---- string form: "ulysses=4,cfg=2,warmup_steps=1" -------------------------------------

    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """Parse the CLI form: comma-separated ``key=value`` with short axis names
        (data, cfg, pipefusion, ring, ulysses, tensor) and settings by name. "" or "serial" is
        the default config."""
        text = text.strip()
        if text in ("", "serial"):
            return cls()
        settings = {f.name: f for f in dataclasses.fields(cls) if not f.name.endswith("_degree")}
        kwargs: dict[str, object] = {}
        for item in text.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not value:
                raise ValueError(f"{item!r} in parallel config {text!r} is not key=value; e.g. 'ulysses=4,cfg=2'")
            if key in AXES:
                name = f"{key}_degree"
            elif key.endswith("_degree") and key[: -len("_degree")] in AXES or key in settings:
                name = key
            else:
                valid = ", ".join(AXES + tuple(settings))
                raise ValueError(f"unknown parallel config key {key!r}; valid keys: {valid}")
            if name in kwargs:
                raise ValueError(f"{key!r} is given twice in parallel config {text!r}")
            kwargs[name] = _parse_value(settings.get(name), key, value)
        return cls(**kwargs)

    def __str__(self) -> str:
        parts = [f"{axis}={degree}" for axis, degree in self.degrees.items() if degree != 1]
        for field in dataclasses.fields(self):
            if not field.name.endswith("_degree") and getattr(self, field.name) != field.default:
                parts.append(f"{field.name}={getattr(self, field.name)}")
        return ",".join(parts) or "serial"


def _parse_value(field: dataclasses.Field | None, key: str, value: str) -> object:
    """A string-form value as its field's type: str, bool (1/0, true/false) or int (degrees)."""
    kind = field.type if field is not None else "int"
    if kind == "str":
        return value
    if kind == "bool":
        flags = {"1": True, "true": True, "0": False, "false": False}
        if value.lower() not in flags:
            raise ValueError(f"{key} must be 1 or 0 (true or false), got {value!r}")
        return flags[value.lower()]
    return _parse_int(key, value)


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r}") from None


# ---- step caching ---------------------------------------------------------------------------

CACHE_POLICIES = ("off", "fbcache", "static")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Step caching: which denoising steps skip all blocks but the first (`parallel/cache.py`).

    A cached step runs the first block, then adds the residual the other blocks produced at the
    last computed step (``blocks 2..N output - block 1 output``) instead of running them. Every
    rank of an image takes the same decision, the one a serial run takes on the whole image.
    String form (CLI ``--cache``): ``"fbcache,threshold=0.1,warmup=1"``, ``"static,warmup=4,every=2"``,
    ``"static,mask=1111010101"``, ``"off"``; ``taylor=1`` adds first-order extrapolation.
    """

    policy: str = "off"
    """off; fbcache: compute a step when the first block's residual changed by more than
    `threshold` (relative L1, over the whole image) since the last computed step; static: the
    fixed schedule of `warmup`/`every` or `mask` (reproducible benchmarks, no host read)."""
    threshold: float = 0.1
    """fbcache: relative L1 change of the first block's residual above which a step is computed."""
    warmup: int = 1
    """The first `warmup` steps are always computed."""
    every: int = 2
    """static: after warm-up, compute every `every`-th step (the others are cached)."""
    mask: str = ""
    """static: explicit per-step schedule, "1" compute / "0" cache (steps past its end compute); overrides warmup/every."""
    taylor: int = 0
    """1: a cached step extrapolates the residual linearly from the last two computed steps
    (TaylorSeer, first order) instead of reusing the last one as it is."""
    max_cached: int = 0
    """fbcache: at most this many cached steps in a row (0: no limit)."""

    def __post_init__(self) -> None:
        if self.policy not in CACHE_POLICIES:
            raise ValueError(f"cache policy {self.policy!r} is unknown; use one of {', '.join(CACHE_POLICIES)}")
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"cache threshold must be a number >= 0, got {self.threshold!r}")
        for name in ("warmup", "max_cached"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"cache {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"cache every must be an integer >= 1 (1 = compute every step), got {self.every!r}")
        if set(self.mask) - {"0", "1"}:
            raise ValueError(f"cache mask must be a string of 0 (cache) and 1 (compute), one per step, got {self.mask!r}")
        if self.taylor not in (0, 1):
            raise ValueError(f"cache taylor must be 0 (reuse the residual) or 1 (extrapolate it), got {self.taylor!r}")

    @property
    def enabled(self) -> bool:
        return self.policy != "off"

    def scheduled(self, step: int) -> bool:
        """static: whether the fixed schedule computes `step` (0-based)."""
        if self.mask:
            return step >= len(self.mask) or self.mask[step] == "1"
        return step < self.warmup or (step - self.warmup + 1) % self.every == 0

    @classmethod
    def parse(cls, text: str | None) -> CacheConfig:
        """Parse the CLI form: a policy, then comma-separated ``key=value`` settings."""
        text = (text or "").strip()
        if text in ("", "off"):
            return cls()
        policy, *items = (part.strip() for part in text.split(","))
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, object] = {}
        for item in items:
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or key not in kinds or key == "policy":
                valid = ", ".join(k for k in kinds if k != "policy")
                raise ValueError(f"{item!r} in cache {text!r} is not key=value with a key of {valid}; e.g. 'fbcache,threshold=0.1'")
            kwargs[key] = value if kinds[key] == "str" else _parse_number(kinds[key], key, value)
        return cls(policy=policy, **kwargs)

    def __str__(self) -> str:
        parts = [self.policy] + [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                                 if f.name != "policy" and getattr(self, f.name) != f.default]
        return ",".join(parts)


def _parse_number(kind: str, key: str, value: str) -> object:
    if kind == "float":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"cache {key} must be a number, got {value!r}") from None
    return _parse_int(key, value)
