"""`TrainConfig`: what a training run does, on how many ranks, split how.

Plain frozen data, like `ParallelConfig`: it knows nothing about torch.distributed and checks
itself in ``__post_init__``, so a bad run fails with a `ValueError` naming the fix before any
process starts. Live state (the model, the optimizer, the step) lives in `Trainer`.

The degrees reuse `ParallelConfig`'s axes where they mean the same: ``data`` (replicas),
``ring`` / ``ulysses`` (sequence parallelism) and ``tensor`` (Megatron-style sharding); training
adds ``fsdp`` (FSDP2 sharding of weights, gradients and optimizer state) and ``pipeline`` (stages
of blocks, fed `microbatches` at a time). The product of the degrees is the world size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ditmesh.config import ParallelConfig

# Training mesh axes, outer -> inner. Pipeline outermost (its point-to-point traffic is the
# lightest), then the two data axes (FSDP's all-gathers inside the replicas, as HSDP places
# them), then the sequence and tensor axes, which talk in every layer, on neighbouring ranks.
TRAIN_AXES = ("pipeline", "data", "fsdp", "ring", "ulysses", "tensor")

SCHEDULES = ("1f1b", "gpipe")
MIXED_PRECISION = ("no", "bf16")
OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
"""The attention projections of every block (what diffusers' FLUX LoRA script trains by default)."""

_SETTING_KEYS = {"microbatches": "microbatches", "schedule": "pipeline_schedule"}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: parallel degrees (1 = off), optimisation, LoRA, numerics, checkpoints.

    Build it directly, or from the CLI's forms: ``TrainConfig.from_parallel("data=2", steps=50)``.
    """

    # ---- parallel degrees ----
    data_degree: int = 1
    """Replicas (DDP): each holds the whole model and trains on its share of every batch."""
    fsdp_degree: int = 1
    """FSDP2: weights, gradients and optimizer state sharded over these ranks, which also split the
    batch. With data_degree > 1 the two make HSDP (sharded inside a replica, replicated across)."""
    pipeline_degree: int = 1
    """Pipeline stages: the transformer's blocks split over ranks (the model's stage plan)."""
    ring_degree: int = 1
    """Ring attention over the image tokens of each example (sequence parallelism)."""
    ulysses_degree: int = 1
    """Ulysses: image tokens sharded, all-to-all to split heads for attention (long sequences)."""
    tensor_degree: int = 1
    """Megatron-style tensor parallelism from the model's tensor plan (full fine-tune only)."""
    microbatches: int | None = None
    """Pipeline: each rank's batch is cut into this many microbatches that flow through the stages
    (None: one per stage, the fewest that keep every stage busy)."""
    pipeline_schedule: str = "1f1b"
    """Pipeline schedule from torch.distributed.pipelining: "1f1b" (less memory) or "gpipe"."""

    # ---- optimisation ----
    steps: int = 100
    """Optimizer steps in the whole run."""
    batch_size: int | None = None
    """Examples per micro-step over all ranks (the global batch; split over data x fsdp ranks).
    None: the smallest that gives every rank work, one example per data x fsdp rank and microbatch."""
    gradient_accumulation: int = 1
    """Micro-steps whose gradients add up to one optimizer step (effective batch = batch_size x this)."""
    lr: float = 1e-4
    """Learning rate (constant)."""
    optimizer: str = "adamw"
    """"adamw" or "sgd" (plain SGD: linear in the gradients, what the equivalence tests use)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""

    # ---- LoRA ----
    lora_rank: int = 16
    """LoRA rank; 0 trains every weight of the transformer (full fine-tune)."""
    lora_alpha: float | None = None
    """LoRA alpha (the update is scaled by alpha / rank); None = rank."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Linear layers that get LoRA adapters, as dotted name suffixes ("attn.to_q" matches every block's)."""

    # ---- numerics and objective ----
    mixed_precision: str = "no"
    """"bf16": frozen weights stored in bf16 and the forward under bf16 autocast; trained
    parameters, gradients and optimizer state stay fp32. "no": fp32 throughout."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~30% more compute)."""
    resolution: int = 512
    """Training images are resized (shorter side) and center-cropped to this square size in pixels."""
    max_sequence_length: int = 512
    """Text tokens per caption (T5)."""
    guidance: float = 3.5
    """Guidance value fed to guidance-distilled models (FLUX.1-dev) during training (diffusers' default)."""

    # ---- run ----
    checkpoint_every: int = 0
    """Write a resumable checkpoint every this many steps and at the last (0: none; a run that
    crashes then starts over)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    seed: int = 0
    """Seeds the LoRA initialisation, the data order, and each example's noise and timestep."""

    def __post_init__(self) -> None:
        for name in (*(f"{axis}_degree" for axis in TRAIN_AXES), "steps", "gradient_accumulation", "resolution",
                     "max_sequence_length", "keep_checkpoints"):
            _check_positive(name, getattr(self, name))
        if self.microbatches is not None:
            _check_positive("microbatches", self.microbatches)
        if self.batch_size is None:  # resolved here, so the stored config says what ran
            object.__setattr__(self, "batch_size", self.batch_ranks * self.num_microbatches)
        _check_positive("batch_size", self.batch_size)
        for name in ("lora_rank", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_choice("pipeline_schedule", self.pipeline_schedule, SCHEDULES)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 (or None = lora_rank), got {self.lora_alpha!r}")
        if not isinstance(self.lora_targets, tuple) or (self.lora_rank and not self.lora_targets):
            raise ValueError(f"lora_targets must be a non-empty tuple of layer names, got {self.lora_targets!r}")
        self._check_batch()
        self._check_composition()

    def _check_batch(self) -> None:
        if self.batch_size % self.batch_ranks:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over the {self.batch_ranks} data x fsdp ranks; "
                f"use a multiple of {self.batch_ranks} (e.g. {self.batch_ranks * max(1, self.batch_size // self.batch_ranks)})"
            )
        if self.local_batch_size % self.num_microbatches:
            raise ValueError(
                f"each rank's batch of {self.local_batch_size} does not split into {self.num_microbatches} microbatches; "
                f"use batch_size {self.batch_ranks * self.num_microbatches} (or a multiple) or fewer microbatches"
            )
        if self.num_microbatches > 1 and self.pipeline_degree == 1:
            raise ValueError("microbatches only apply to pipeline parallelism; set pipeline=N or drop microbatches")
        if self.pipeline_schedule == "1f1b" and self.pipeline_degree > self.num_microbatches:
            raise ValueError(f"the 1F1B schedule needs at least as many microbatches as stages ({self.pipeline_degree}); "
                             f"use microbatches={self.pipeline_degree} (batch_size a multiple of "
                             f"{self.batch_ranks * self.pipeline_degree}) or schedule=gpipe")

    def _check_composition(self) -> None:
        """Refuse the combinations no strategy implements, naming the ones that exist."""
        if self.pipeline_degree > 1 and (self.fsdp_degree, self.sequence_degree, self.tensor_degree) != (1, 1, 1):
            raise ValueError("pipeline parallelism composes with data only; use pipeline=N with data=M, "
                             "or drop pipeline for fsdp, ring/ulysses or tensor")
        if self.sequence_degree > 1 and (self.fsdp_degree, self.tensor_degree) != (1, 1):
            raise ValueError("sequence parallelism (ring/ulysses) composes with data only in training; "
                             "use ulysses=N with data=M, or tensor with data/fsdp")
        if self.tensor_degree > 1 and self.lora_rank:
            raise ValueError("LoRA under tensor parallelism is not supported (the adapters would need their own "
                             "sharding plan); use lora_rank=0 (full fine-tune) with tensor=N, or train LoRA with "
                             "data, fsdp, pipeline or ulysses")

    # ---- derived sizes ----

    @property
    def degrees(self) -> dict[str, int]:
        """Degree of each training mesh axis, outer -> inner."""
        return {axis: getattr(self, f"{axis}_degree") for axis in TRAIN_AXES}

    @property
    def world_size(self) -> int:
        """Processes (GPUs) this run needs: the product of the degrees."""
        return math.prod(self.degrees.values())

    @property
    def batch_ranks(self) -> int:
        """Ranks that hold different examples of a batch: data x fsdp."""
        return self.data_degree * self.fsdp_degree

    @property
    def local_batch_size(self) -> int:
        """Examples each rank trains on per micro-step."""
        return self.batch_size // self.batch_ranks

    @property
    def num_microbatches(self) -> int:
        """Microbatches per rank's batch: `microbatches`, or one per pipeline stage."""
        return self.microbatches or self.pipeline_degree

    @property
    def sequence_degree(self) -> int:
        """Ranks each example's image tokens are split over: ring x ulysses."""
        return self.ring_degree * self.ulysses_degree

    @property
    def lora(self) -> bool:
        """True when training LoRA adapters, False for a full fine-tune."""
        return self.lora_rank > 0

    def parallel_config(self) -> ParallelConfig:
        """The inference `ParallelConfig` whose ring/ulysses/tensor axes the training mesh shares
        (what `ditmesh.parallel.tensor` and `ditmesh.parallel.sequence` read); the other training
        axes fold into its data axis."""
        inner = self.sequence_degree * self.tensor_degree
        return ParallelConfig(data_degree=self.world_size // inner, ring_degree=self.ring_degree,
                              ulysses_degree=self.ulysses_degree, tensor_degree=self.tensor_degree)

    def check_world_size(self, world_size: int) -> None:
        """Raise `ValueError` unless this run fills exactly `world_size` processes."""
        if world_size != self.world_size:
            raise ValueError(
                f"training with {self.parallel_str()} needs {self.world_size} processes but the world has "
                f"{world_size}; change the degrees so their product is {world_size}"
            )

    # ---- string form of the parallel layout: "data=2,fsdp=2" ---------------------------------

    @classmethod
    def from_parallel(cls, text: str, **settings: object) -> TrainConfig:
        """A config from the CLI's ``--parallel`` form (comma-separated ``axis=degree`` over
        pipeline, data, fsdp, ring, ulysses, tensor, plus ``microbatches=N`` and ``schedule=1f1b|gpipe``;
        "" or "serial" = one process) and the other settings by field name."""
        return cls(**parse_parallel(text), **settings)

    def parallel_str(self) -> str:
        """The ``--parallel`` form of this config's layout ("serial" when every degree is 1)."""
        parts = [f"{axis}={degree}" for axis, degree in self.degrees.items() if degree != 1]
        if self.microbatches is not None:
            parts.append(f"microbatches={self.microbatches}")
        if self.pipeline_degree > 1:
            parts.append(f"schedule={self.pipeline_schedule}")
        return ",".join(parts) or "serial"

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able fields (checkpoints store them to refuse resuming a different run)."""
        return {field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)}


def parse_parallel(text: str) -> dict[str, object]:
    """Keyword arguments of `TrainConfig` from the ``--parallel`` form, e.g. "pipeline=2,microbatches=4"."""
    text = text.strip()
    if text in ("", "serial"):
        return {}
    kwargs: dict[str, object] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value:
            raise ValueError(f"{item!r} in --parallel {text!r} is not key=value; e.g. 'data=2,fsdp=2'")
        if key in TRAIN_AXES:
            name: str = f"{key}_degree"
        elif key in _SETTING_KEYS:
            name = _SETTING_KEYS[key]
        else:
            raise ValueError(f"unknown --parallel key {key!r} for training; valid keys: {', '.join(TRAIN_AXES + tuple(_SETTING_KEYS))}")
        if name in kwargs:
            raise ValueError(f"{key!r} is given twice in --parallel {text!r}")
        kwargs[name] = value if name == "pipeline_schedule" else _parse_int(key, value)
    return kwargs


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r}") from None


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    _check_int(name, value, minimum=1)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is unknown; use one of {', '.join(choices)}")


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
