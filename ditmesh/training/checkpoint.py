"""Resumable checkpoints with `torch.distributed.checkpoint` (DCP).

A checkpoint holds the trained parameters (LoRA adapters, or every weight of a full fine-tune)
and the optimizer state, each rank writing its own shards (DDP replicas are written once,
FSDP and tensor-parallel shards as the DTensors they are), plus ``trainer.json`` with the step
and the config. Frozen base weights are not saved: they come from the model again.

Layout under the output folder: ``checkpoints/step-000100/``. A checkpoint is written into
``checkpoints/.step-000100.tmp`` and renamed only once every rank's shards are on disk, so a
run killed mid-save leaves the previous checkpoint as the latest complete one: an interrupted
run loses at most the steps since it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ditmesh.training.config import TrainConfig

FOLDER = "checkpoints"
META = "trainer.json"
# Settings a resumed run may change: how long it runs and how it checkpoints.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints")
_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
# Loading into the whole module: the frozen weights are (rightly) missing from the checkpoint.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)


def save(output: Path, step: int, strategy: Any, optimizer: torch.optim.Optimizer, config: TrainConfig) -> Path:
    """Write the checkpoint of `step` (collective: every rank calls it); return its folder."""
    root = Path(output) / FOLDER
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    model_state, optim_state = get_state_dict(strategy.checkpoint_module(), optimizer, options=_OPTIONS)
    prefix = strategy.checkpoint_prefix
    dcp.save({f"{prefix}model": model_state, f"{prefix}optim": optim_state}, checkpoint_id=tmp)
    # dcp.save returns on the coordinator (rank 0) only after every rank's shards are written.
    if _rank() == 0:
        (tmp / META).write_text(json.dumps({"step": step, "config": config.to_dict()}, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # a run started over writes the same step again
        os.replace(tmp, final)
        _prune(root, config.keep_checkpoints)
    _barrier()  # nobody starts the next step's checkpoint (or reads this one) before the rename
    return final


def load_latest(output: Path, strategy: Any, optimizer: torch.optim.Optimizer, config: TrainConfig) -> int:
    """Load the latest complete checkpoint under `output` into the strategy's module and the
    optimizer; return its step (0 and nothing loaded when there is none). Collective."""
    folder = _agree(latest(Path(output)))
    if folder is None:
        return 0
    meta = json.loads((folder / META).read_text())
    check_compatible(meta["config"], config, folder)
    module = strategy.checkpoint_module()
    model_state, optim_state = get_state_dict(module, optimizer, options=_OPTIONS)  # the shapes to fill
    prefix = strategy.checkpoint_prefix
    state = {f"{prefix}model": model_state, f"{prefix}optim": optim_state}
    dcp.load(state, checkpoint_id=folder)
    result = set_state_dict(module, optimizer, model_state_dict=state[f"{prefix}model"],
                            optim_state_dict=state[f"{prefix}optim"], options=_LOAD_OPTIONS)
    trained = {name for name, param in module.named_parameters() if param.requires_grad}
    assert not result.unexpected_keys and not trained & set(result.missing_keys), result
    return int(meta["step"])


def clear(output: Path) -> None:
    """Delete every checkpoint under `output` (a run that starts over). Collective."""
    if _rank() == 0:
        shutil.rmtree(Path(output) / FOLDER, ignore_errors=True)
    _barrier()


def latest(output: Path) -> Path | None:
    """The newest complete checkpoint folder under `output`, or None."""
    root = Path(output) / FOLDER
    done = sorted(p for p in root.glob("step-*") if (p / META).exists()) if root.is_dir() else []
    return done[-1] if done else None


def check_compatible(saved: dict[str, Any], config: TrainConfig, folder: Path) -> None:
    """`ValueError` naming the difference unless `config` continues the run that wrote `saved`."""
    current = config.to_dict()
    changed = [key for key in current if key not in RESUMABLE_CHANGES and saved.get(key) != current[key]]
    if changed:
        diffs = ", ".join(f"{key}={saved.get(key)!r} (now {current[key]!r})" for key in changed)
        raise ValueError(f"the checkpoint {folder} was written by a different run: {diffs}; resume with the same "
                         "settings (only steps and checkpointing may change) or write to a new output folder")


def _agree(folder: Path | None) -> Path | None:
    """Rank 0's answer on every rank (the ranks must load the same checkpoint)."""
    if not dist.is_initialized():
        return folder
    box = [str(folder) if folder else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / META).exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
