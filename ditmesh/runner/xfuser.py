"""`XFuserWorker`: xDiT (xfuser) pipelines behind the same runner, CLI and server as `DiffusionWorker`.

    from ditmesh import DistributedRunner
    from ditmesh.runner import XFuserWorker

    async with DistributedRunner(XFuserWorker, world_size=2) as runner:
        await runner.start(model="/models/FLUX.1-dev", parallel="pipefusion=2", dtype="bfloat16")
        result = await runner.invoke({"prompt": "a cat", "steps": 28, "seed": 0})
        result["images"][0].save("cat.png")

    ditmesh generate --engine xfuser --model /models/FLUX.1-dev --parallel ulysses=2 -o cat.png

The request and the result are `DiffusionWorker`'s (``{"images", "seed", "seconds"}`` on rank 0,
``{"step", "of"}`` stream events, image i of a request drawn from ``seed + i``); xDiT does the
parallel work. Our `ParallelConfig` maps onto `xfuser.xFuserArgs` (`xfuser_args`); what xDiT
cannot do is a `ValueError` before any process starts (`check_xfuser`). xDiT returns the images
only on the last rank of each data replica: every rank then joins one gather that brings them to
rank 0. Needs ``pip install 'ditmesh[xfuser]'`` and CUDA GPUs (xfuser refuses to import without an
accelerator); tested with xfuser 0.7.0.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ditmesh.config import ParallelConfig
from ditmesh.runner.protocol import RequestCancelled
from ditmesh.runner.worker import DistributedWorker

XFUSER_VERSION = "0.7.0"
"""The xfuser release this module is tested with (the `xfuser` extra pins it)."""

# Our ParallelConfig field -> (xFuserArgs field, how the value maps). xDiT has no counterpart of
# the fields left out; `check_xfuser` refuses them unless they keep their defaults.
_DEGREES = {
    "data_degree": "data_parallel_degree",
    "pipefusion_degree": "pipefusion_parallel_degree",
    "ring_degree": "ring_degree",
    "ulysses_degree": "ulysses_degree",
    "tensor_degree": "tensor_parallel_degree",
}
_SETTINGS = {"pipefusion_patches": "num_pipeline_patch", "warmup_steps": "warmup_steps"}
_DITMESH_ONLY = ("attention_backend", "ulysses_head_groups", "reorder_comms")

# What xDiT 0.7.0's pipelines refuse at call time (their `check_model_parallel_state`), by diffusers
# pipeline class: checked here, before loading, so the user hears it before the weights load.
XDIT_REFUSES = {
    "FluxPipeline": ("cfg",),
    "FluxControlPipeline": ("cfg",),
    "StableDiffusionXLPipeline": ("pipefusion", "ring", "ulysses"),
    "Lumina2Pipeline": ("pipefusion",),
}
_TINY_CLASSES = {"tiny-flux": "FluxPipeline", "tiny-sd3": "StableDiffusion3Pipeline",
                 "tiny-sdxl": "StableDiffusionXLPipeline"}


def xfuser_args(config: ParallelConfig, model: str = "", **extra: Any) -> dict[str, Any]:
    """The `xfuser.xFuserArgs` keyword arguments that run `config` on `model`; `extra` (other
    xFuserArgs fields, e.g. ``use_parallel_vae=True``) is added as given. Raises `ValueError` for
    what xDiT cannot do. Needs no xfuser: the CLI calls it before any process starts."""
    check_xfuser(config, model)
    args: dict[str, Any] = {"model": model, "use_cfg_parallel": config.cfg_degree == 2}
    args.update({theirs: getattr(config, ours) for ours, theirs in _DEGREES.items()})
    args.update({theirs: getattr(config, ours) for ours, theirs in _SETTINGS.items()})
    clashes = sorted(set(extra) & (set(args) | {"use_ray", "ray_world_size", "dit_parallel_size", "vae_parallel_size"}))
    if clashes:
        raise ValueError(f"xfuser argument(s) {', '.join(clashes)} come from `parallel` and `model`; "
                         "set the degrees in the parallel string (e.g. 'pipefusion=2,ulysses=2') instead")
    return {**args, **extra}


def check_xfuser(config: ParallelConfig, model: str = "") -> None:
    """Raise `ValueError` naming what xDiT can do if `config` asks for something it cannot do
    (a ditmesh-only setting, or a strategy `model`'s xDiT pipeline refuses)."""
    defaults = ParallelConfig()
    changed = [name for name in _DITMESH_ONLY if getattr(config, name) != getattr(defaults, name)]
    if changed:
        raise ValueError(f"{', '.join(changed)} are ditmesh settings xDiT has no counterpart of; drop them from "
                         "the parallel string (xDiT takes data, cfg, pipefusion, ring, ulysses, tensor, "
                         "pipefusion_patches, warmup_steps) or use --engine ditmesh")
    pipeline = pipeline_class_name(model)
    refused = [axis for axis in XDIT_REFUSES.get(pipeline or "", ()) if config.degrees[axis] > 1]
    if refused:
        allowed = [axis for axis in ("data", "cfg", "pipefusion", "ring", "ulysses", "tensor")
                   if axis not in XDIT_REFUSES[pipeline]]
        raise ValueError(f"xDiT {XFUSER_VERSION} runs {pipeline} without {', '.join(refused)} parallelism; "
                         f"use {', '.join(allowed)} for it, or --engine ditmesh")


def pipeline_class_name(model: str) -> str | None:
    """The diffusers pipeline class `model` loads as (a tiny name, or a folder's model_index.json);
    None if it cannot be read here (the worker's loading then names the problem)."""
    if model in _TINY_CLASSES:
        return _TINY_CLASSES[model]
    index = Path(model).expanduser() / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def replica_ranks(world_size: int, data_degree: int) -> list[list[int]]:
    """The ranks of each data replica in xDiT's layout (axes "tp-sp-pp-cfg-dp", data outermost):
    replica d holds the consecutive ranks d * R .. (d + 1) * R - 1, R = world_size // data_degree."""
    size = world_size // data_degree
    return [list(range(d * size, (d + 1) * size)) for d in range(data_degree)]


def share(num_items: int, data_degree: int, replica: int) -> range:
    """The items (images of a request, in order) data replica `replica` generates: consecutive
    blocks of ceil(num_items / data_degree); the last replicas may get fewer or none."""
    block = -(-num_items // data_degree)
    return range(min(replica * block, num_items), min((replica + 1) * block, num_items))


class XFuserWorker(DistributedWorker):
    """Serves text-to-image requests with an xDiT (xfuser) pipeline on every rank; rank 0 returns
    the images. Requests, results and events are `DiffusionWorker`'s."""

    _xdit_started = False  # set once xDiT's groups exist on this rank: teardown destroys them
    # xDiT's new_group() calls (PipeFusion, Ulysses) fail with NCCL error 1 on a default group
    # made with device_id (its own init passes none); torch.cuda.set_device still runs first.
    bind_device_at_init = False

    def setup(self, model: str = "tiny-flux", parallel: str | ParallelConfig = "serial", dtype: str = "float32",
              compile: bool | None = None, cuda_graphs: bool | None = None, gather_timeout: float = 900.0,
              **xfuser_kwargs: Any) -> None:
        """Load `model` (a local diffusers folder, or a tiny name) in `dtype`, wrapped in the xDiT
        pipeline of its class, run as `parallel` says (our string form, mapped by `xfuser_args`).
        `compile` is xDiT's ``use_torch_compile``; other keyword arguments are `xFuserArgs` fields.
        `gather_timeout` bounds how long a rank waits at the gather of a request's images for the
        slowest data replica (seconds)."""
        config = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig.parse(parallel)
        config.check_world_size(self.world_size)
        if cuda_graphs:
            raise ValueError("xDiT has no CUDA-graph capture; drop --cuda-graphs or use --engine ditmesh")
        args = xfuser_args(config, model, use_torch_compile=bool(compile), **xfuser_kwargs)
        self.config = config
        self.replicas = replica_ranks(self.world_size, config.data_degree)
        self.replica = self.rank // len(self.replicas[0])
        self._make_groups(gather_timeout)
        self.pipe = self.load(model, args, dtype)
        self.info = _model_info(self.pipe, model, config, dtype)

    def load(self, model: str, args: dict[str, Any], dtype: str) -> Any:
        """The xDiT pipeline, on this rank's device, with xDiT's groups made inside ours."""
        _init_xdit(self.rank, self.world_size, self.device)
        self._xdit_started = True
        from xfuser import xFuserArgs
        from xfuser.core.distributed import get_data_parallel_rank
        from xfuser.model_executor.pipelines.register import xFuserPipelineWrapperRegister

        from ditmesh.models.loading import load_pipeline

        fields = {field.name for field in dataclasses.fields(xFuserArgs)}
        unknown = sorted(set(args) - fields)
        if unknown:
            raise ValueError(f"xFuserArgs {XFUSER_VERSION} has no field(s) {', '.join(unknown)}; "
                             "see xfuser/config/args.py for the fields it takes")
        engine_config, _ = xFuserArgs(**args).create_config()
        pipe = load_pipeline(model, dtype=dtype)  # on the CPU: xDiT converts the modules, then .to(device)
        pipe = xFuserPipelineWrapperRegister.get_class(pipe)(pipe, engine_config).to(self.device)
        assert get_data_parallel_rank() == self.replica, "xDiT's data replicas are not replica_ranks'"
        return pipe

    def teardown(self) -> None:
        if self._xdit_started:
            _destroy_xdit()

    def __call__(
        self,
        streaming: bool = False,
        prompt: str | list[str] = "a photo of an astronaut riding a horse",
        negative_prompt: str | None = None,
        steps: int = 4,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        num_images: int = 1,
        guidance: float | None = None,
        preview: bool = False,
        describe: bool = False,
        **pipeline_kwargs: Any,
    ) -> dict[str, Any] | None:
        """Generate `num_images` images per prompt; ``{"images": [PIL...], "seed", "seconds"}`` on
        rank 0 (None elsewhere), as `DiffusionWorker`. Image i (prompts in order, `num_images`
        each) comes from ``torch.Generator().manual_seed(seed + i)`` and is made by data replica
        i // ceil(total / data). Streaming sends ``{"step", "of"}`` after each step; under
        PipeFusion (xDiT calls the step callback on the last stage only) after each pipelined run.
        A request its caller gives up stops at the next such point on every rank of the replica
        (`RequestCancelled`). `preview` is accepted and ignored. ``describe=True`` returns what
        requests are checked against (`ditmesh serve` asks once)."""
        if describe:
            return self.info
        started = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_images < 1:
            raise ValueError(f"a request for no image ({len(prompts)} prompt(s), num_images={num_images}); "
                             "send at least one prompt and num_images >= 1")
        size = self.info["default_size"] if self.info["model"] in _TINY_CLASSES else None  # tiny: DiffusionWorker's size
        call = dict(num_inference_steps=steps, height=height or size, width=width or size, output_type="pil",
                    **pipeline_kwargs)
        if negative_prompt is not None:
            call["negative_prompt"] = negative_prompt
        if guidance is not None:
            call["guidance_scale"] = guidance
        mine = share(len(prompts) * num_images, self.config.data_degree, self.replica)
        try:
            images, error = self._generate(prompts, num_images, seed, mine, call, streaming), None
        except Exception as exc:  # still join the gather below: no rank is left waiting for this one
            images, error = None, exc
        return self._gather(images, error, started, seed)

    def _generate(self, prompts: list[str], num_images: int, seed: int, items: range, call: dict[str, Any],
                  streaming: bool) -> list[Any] | None:
        """This replica's images (None on ranks xDiT returns nothing on): one pipeline call per
        prompt, its images seeded one generator each."""
        runs = _runs(items, num_images)
        images: list[Any] | None = []
        for index, (prompt_index, run) in enumerate(runs):
            progress = _Progress(self, call["num_inference_steps"], index, len(runs),
                                 streaming, per_step=self.config.pipefusion_degree == 1)
            out = self.pipe(prompt=prompts[prompt_index], num_images_per_prompt=len(run),
                            generator=[torch.Generator().manual_seed(seed + i) for i in run],
                            callback_on_step_end=progress.on_step_end, **call)
            progress.after_run()
            images = None if out is None or images is None else images + list(out.images)
        return images

    def _gather(self, images: list[Any] | None, error: Exception | None, started: float, seed: int) -> dict[str, Any] | None:
        """Bring every replica's images to rank 0 (one gather all ranks join, whatever they hold),
        in item order; re-raise an error a rank met (rank 0's own first, with its traceback)."""
        mine = (self.replica, images, _portable(error), _traceback(error))
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        if self.world_size > 1:
            dist.gather_object(mine, gathered, dst=0, group=self._gather_group)
        else:
            gathered = [mine]
        if error is not None:
            raise error
        if self.rank != 0:
            return None
        assert gathered is not None
        for rank, (_, _, remote_error, remote_traceback) in enumerate(gathered):
            if remote_error is not None:
                raise remote_error from RuntimeError(f"raised on rank {rank}:\n{remote_traceback}")
        by_replica: dict[int, list[Any]] = {}
        for replica, replica_images, _, _ in gathered:
            if replica_images is not None:
                by_replica.setdefault(replica, replica_images)  # tensor ranks all return the same images
        missing = [r for r in range(len(self.replicas)) if r not in by_replica]
        if missing:
            raise RuntimeError(f"data replica(s) {missing} returned no images: no rank of theirs is xDiT's last")
        ordered = [image for r in range(len(self.replicas)) for image in by_replica[r]]
        return {"images": ordered, "seed": seed, "seconds": time.perf_counter() - started}

    def _make_groups(self, gather_timeout: float) -> None:
        """Gloo groups, made on every rank in the same order: one per data replica (the per-step
        cancel check: its ranks step together, an idle replica runs no steps), one over all ranks
        (the images' gather, bounded by `gather_timeout`)."""
        if self.world_size == 1:
            self._replica_group = self._gather_group = None
            return
        self._replica_group, _ = dist.new_subgroups_by_enumeration(self.replicas, backend="gloo")
        self._gather_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=gather_timeout))


class _Progress:
    """One pipeline call's step callback: checks for cancellation and streams ``{"step", "of"}``.

    Hazard: under PipeFusion xDiT calls the callback on the last pipeline stage only (once per
    patch in its pipelined phase), so a collective there would hang the other stages; then the
    check and the event come once, after the call, on every rank of the replica."""

    def __init__(self, worker: XFuserWorker, steps: int, run: int, runs: int, streaming: bool, per_step: bool):
        self.worker, self.steps, self.run, self.runs = worker, steps, run, runs
        self.streaming, self.per_step = streaming, per_step

    def on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.per_step:
            self._check_and_report(step + 1)
        return callback_kwargs

    def after_run(self) -> None:
        if not self.per_step:
            self._check_and_report(self.steps)

    def _check_and_report(self, step: int) -> None:
        worker = self.worker
        if worker.cancel_requested(worker._replica_group):
            raise RequestCancelled(f"the caller gave up the request; stopped after step {step} of {self.steps}")
        if self.streaming:
            worker.add_streaming_result({"step": self.run * self.steps + step, "of": self.runs * self.steps})


def _runs(items: range, num_images: int) -> list[tuple[int, list[int]]]:
    """`items` grouped by prompt: (prompt index, the item indices of that prompt), in order."""
    runs: list[tuple[int, list[int]]] = []
    for item in items:
        prompt_index = item // num_images
        if runs and runs[-1][0] == prompt_index:
            runs[-1][1].append(item)
        else:
            runs.append((prompt_index, [item]))
    return runs


def _portable(error: Exception | None) -> Exception | None:
    """`error` if it survives pickling (the gather pickles it), else a RuntimeError saying what it was."""
    if error is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _traceback(error: Exception | None) -> str | None:
    import traceback

    return None if error is None else "".join(traceback.format_exception(type(error), error, error.__traceback__))


def _init_xdit(rank: int, world_size: int, device: torch.device) -> None:
    """xDiT's world group inside our already initialised process group.

    xfuser's `create_config` initialises torch.distributed only when it is not, and then never
    makes its own world group: `get_world_group()` would fail ("world group is not initialized").
    `init_distributed_environment` with our rank and size finds the process group initialised and
    only makes xDiT's groups over it (collective: every rank calls it here, in setup)."""
    try:
        from xfuser.core.distributed import init_distributed_environment
    except ImportError as error:
        raise ImportError(f"XFuserWorker needs xfuser ({error}): pip install 'ditmesh[xfuser]' "
                          f"(xfuser {XFUSER_VERSION}), on a machine with CUDA GPUs") from error
    init_distributed_environment(world_size=world_size, rank=rank, local_rank=device.index or 0)


def _destroy_xdit() -> None:
    from xfuser.core.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


def _model_info(pipe: Any, model: str, config: ParallelConfig, dtype: str) -> dict[str, Any]:
    """What a server validates requests against (`DiffusionWorker`'s keys): from ditmesh's adapter
    where it knows the family, else from the pipeline (xDiT runs families ditmesh has no adapter for)."""
    from ditmesh.models import adapter_for
    from ditmesh.models.tiny import TINY_PIPELINES, TINY_SIZE

    inner = getattr(pipe, "module", pipe)  # xDiT's wrapper keeps the diffusers pipeline as .module
    scale = getattr(inner, "vae_scale_factor", 8)
    try:
        adapter = adapter_for(inner)
        family, size_multiple = adapter.name, adapter.size_multiple
    except ValueError:
        family, size_multiple = type(inner).__name__, scale * 2
    default_size = TINY_SIZE if model in TINY_PIPELINES else None
    if default_size is None and getattr(inner, "default_sample_size", None):
        default_size = inner.default_sample_size * scale
    return {"model": model, "family": family, "pipeline": type(inner).__name__, "engine": "xfuser",
            "size_multiple": size_multiple, "default_size": default_size, "parallel": str(config), "dtype": str(dtype)}
