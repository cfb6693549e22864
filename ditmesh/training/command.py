"""``ditmesh train``: train a LoRA (or the whole transformer) on a folder of images with captions.

    python -m ditmesh.training.shapes shapes/
    ditmesh train --model tiny-flux --data shapes/ --parallel data=2 --lora-rank 8 --steps 50 -o lora/
    ditmesh train --model /models/FLUX.1-dev --data photos/ --parallel fsdp=8 --mixed-precision bf16 \\
        --resolution 1024 --batch-size 8 --steps 2000 --checkpoint-every 200 -o lora/

Every check (settings, data, model) runs here before any process starts; then one process per
rank trains through `DistributedRunner` (`TrainingWorker`), rank 0 drawing a progress bar. A rank
that dies is restarted and training resumes from the last checkpoint; running the same command
again into the same output folder resumes too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from ditmesh.models.tiny import TINY_PIPELINES
from ditmesh.training.config import TrainConfig, parse_parallel
from ditmesh.training.data import check_dataset_size, read_folder

TINY_RESOLUTION, TINY_TEXT_LEN = 64, 64
"""Defaults of --resolution / --max-sequence-length for the tiny models (the real ones: 512 / 512)."""
# argparse destination -> TrainConfig field, for the settings passed through as they are.
SETTINGS = {"steps": "steps", "batch_size": "batch_size", "grad_accum": "gradient_accumulation", "lr": "lr",
            "optimizer": "optimizer", "weight_decay": "weight_decay", "lora_rank": "lora_rank",
            "lora_alpha": "lora_alpha", "mixed_precision": "mixed_precision", "guidance": "guidance",
            "checkpoint_every": "checkpoint_every", "seed": "seed"}


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of the command line (unset options keep the config's defaults)."""
    settings: dict[str, Any] = {field: getattr(args, dest) for dest, field in SETTINGS.items()
                                if getattr(args, dest) is not None}
    tiny = args.model in TINY_PIPELINES
    settings["resolution"] = args.resolution or (TINY_RESOLUTION if tiny else 512)
    settings["max_sequence_length"] = args.max_sequence_length or (TINY_TEXT_LEN if tiny else 512)
    if args.lora_targets:
        settings["lora_targets"] = tuple(args.lora_targets)
    if args.gradient_checkpointing:
        settings["gradient_checkpointing"] = True
    return TrainConfig(**parse_parallel(args.parallel), **settings)


def denoiser_skeleton(model: str) -> Any:
    """The denoiser of `model` without its weights (meta device; a tiny model is built whole), for checks."""
    import torch

    from ditmesh.models.loading import load_pipeline

    if model in TINY_PIPELINES:
        return load_pipeline(model).transformer
    import diffusers

    folder = Path(model).expanduser() / "transformer"
    if not (folder / "config.json").is_file():
        raise ValueError(f"no transformer/config.json in {model}; training needs a diffusers pipeline folder with a transformer")
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def run(args: argparse.Namespace) -> int:
    """Check everything, train on `config.world_size` processes, print where the result is."""
    from ditmesh.training.loop import check_model

    config = build_config(args)
    examples = read_folder(args.data, config.resolution)
    check_dataset_size(len(examples), config.batch_size)
    check_model(config, denoiser_skeleton(args.model))
    setup = dict(model=args.model, data=str(args.data), output=str(args.output), config=config, cache=args.cache)
    result = asyncio.run(_train(config, None if args.device == "auto" else args.device, setup, not args.no_resume))
    kind = f"LoRA rank {config.lora_rank}" if config.lora else "full fine-tune"
    resumed = f", resumed from step {result['resumed_from']}" if result["resumed_from"] else ""
    loss = "already complete" if result["loss"] is None else f"final loss {result['loss']:.4f}"
    print(f"wrote {result['output']} ({kind}, {result['steps']} steps, {config.parallel_str()}: {config.world_size} "
          f"process(es){resumed}): {loss}, {result['seconds']:.1f} s")
    return 0


async def _train(config: TrainConfig, device_type: str | None, setup: dict[str, Any], resume: bool) -> dict[str, Any]:
    from ditmesh.runner.protocol import RemoteError
    from ditmesh.runner.runner import DistributedRunner
    from ditmesh.training.worker import TrainingWorker, train_on_runner

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "restart":
            print(f"\nrank {event['rank']} died (exit code {event['exitcode']}); restarting from the last checkpoint",
                  file=sys.stderr)

    runner = DistributedRunner(TrainingWorker, world_size=config.world_size, device_type=device_type)
    try:
        async with runner:
            await runner.start(**setup)  # TrainingWorker.setup on each rank: load, encode, build the trainer
            return await train_on_runner(runner, resume=resume, on_event=on_event)
    except RemoteError as error:
        if error.exc_type.endswith("ValueError"):
            raise ValueError(error.message) from None  # a user error on the ranks: just its message
        raise
