"""`TrainingWorker`: a `DistributedWorker` that trains, and `train_on_runner`, which drives one
through crashes.

    from ditmesh import DistributedRunner
    from ditmesh.training import TrainConfig, TrainingWorker, train_on_runner

    config = TrainConfig.from_parallel("data=2", steps=50, lora_rank=8, resolution=64, checkpoint_every=10)
    runner = DistributedRunner(TrainingWorker, world_size=config.world_size)
    await runner.start(model="tiny-flux", data="shapes/", output="lora/", config=config)
    result = await train_on_runner(runner, on_event=print)   # {"event": "step", "step": 1, "loss": ...}, ...
    # result: {"output": "lora/", "steps": 50, "resumed_from": 0, "loss": ..., "losses": [...], "seconds": ...}

`setup` loads the pipeline, encodes the dataset (split over the ranks, cached under
``output/cache``), frees the encoders and builds the `Trainer`; each request resumes from the
latest checkpoint under ``output/checkpoints`` (if any), trains to ``config.steps`` and writes the
LoRA. If a rank dies, `train_on_runner` restarts every rank and resumes: at most the steps since
the last checkpoint are lost.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ditmesh.models import adapter_for
from ditmesh.models.loading import load_pipeline
from ditmesh.runner.protocol import WorkerDied
from ditmesh.runner.worker import DistributedWorker
from ditmesh.training.config import TrainConfig
from ditmesh.training.data import preprocess, read_folder
from ditmesh.training.loop import Trainer, check_model
from ditmesh.training.mesh import TrainMesh
from ditmesh.training.objective import recipe_for


class TrainingWorker(DistributedWorker):
    """Trains a LoRA (or the whole transformer) of a diffusers pipeline on every rank."""

    def setup(self, model: str = "tiny-flux", data: str | None = None, output: str = "lora",
              config: TrainConfig | dict | None = None, cache: str | None = None, progress_bar: bool = True) -> None:
        """Load `model` (a tiny name or a local diffusers folder), encode the images and captions
        in `data` (cached in `cache`, default ``output/cache``) and build the trainer for `config`
        (a `TrainConfig` or its fields as a dict). Every check runs before the training mesh exists."""
        config = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
        config.check_world_size(self.world_size)
        if data is None:
            raise ValueError("no training data; pass data=<folder of images with captions>")
        self.config, self.output, self.progress_bar = config, Path(output), progress_bar
        pipe = load_pipeline(model, dtype="bfloat16" if config.mixed_precision == "bf16" else "float32", device=self.device)
        examples = read_folder(data, config.resolution, adapter_for(pipe).size_multiple)
        transformer = getattr(pipe, adapter_for(pipe).denoiser_attr)
        check_model(config, transformer)
        dataset = preprocess(pipe, examples, cache or self.output / "cache", recipe=recipe_for(pipe),
                             resolution=config.resolution, max_sequence_length=config.max_sequence_length,
                             model_id=model, device=self.device)
        del pipe  # the encoders and the VAE are done: only the transformer trains
        self.trainer = Trainer(config, transformer, dataset, mesh=TrainMesh.build(config), device=self.device,
                               output=self.output)

    def __call__(self, streaming: bool = False, resume: bool = True) -> dict[str, Any] | None:
        """Train to ``config.steps`` from the latest checkpoint (`resume`) or from scratch, deleting
        the checkpoints (not `resume`); write the result.

        Streams ``{"event": "step", "step", "of", "loss", "seconds", "steps_per_s", "examples_per_s"}``
        after each optimizer step; rank 0 also draws a tqdm bar on its stderr. Returns (rank 0)
        ``{"output", "steps", "resumed_from", "loss", "losses", "seconds"}``.
        """
        from tqdm import tqdm

        started = time.perf_counter()
        if not resume:
            self.trainer.start_over()
        start = self.trainer.resume()  # 0 when there is no checkpoint
        bar = tqdm(total=self.config.steps, initial=start, unit="step", desc="train",
                   disable=self.rank != 0 or not self.progress_bar)

        def on_step(progress: dict[str, Any]) -> None:
            self.add_streaming_result({"event": "step", **progress})
            bar.set_postfix(loss=f"{progress['loss']:.4f}", refresh=False)
            bar.update(1)

        losses = self.trainer.train(on_step)
        bar.close()
        folder = self.trainer.save(self.output)
        if self.rank != 0:
            return None
        return {"output": str(folder), "steps": self.trainer.step, "resumed_from": start,
                "loss": losses[-1] if losses else None, "losses": losses, "seconds": time.perf_counter() - started}


async def train_on_runner(runner: Any, *, resume: bool = True, on_event: Callable[[dict[str, Any]], None] | None = None,
                          max_restarts: int = 3) -> dict[str, Any]:
    """Run one training request on a started `DistributedRunner` of `TrainingWorker`s; return its result.

    If a rank dies (`WorkerDied`: killed, out of memory, a lost GPU), restart every rank (same
    setup) and continue from the latest checkpoint, up to `max_restarts` times. `on_event` gets
    each step's progress event and ``{"event": "restart", "rank", "exitcode"}`` after a death.
    """
    restarts = 0
    while True:
        try:
            async for item in runner.stream({"resume": resume or restarts > 0}, as_text_events=False):
                if isinstance(item, dict) and item.get("event") == "step":
                    if on_event is not None:
                        on_event(item)
                else:
                    return item
        except WorkerDied as died:
            if restarts >= max_restarts:
                raise
            restarts += 1
            if on_event is not None:
                on_event({"event": "restart", "rank": died.rank, "exitcode": died.exitcode})
            await runner.restart()
