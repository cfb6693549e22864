"""Training: every strategy vs the serial run of the same tiny FLUX on the same data.

The dataset (32 drawn 64x64 images with captions) is written and encoded serially once per
session; each strategy trains a fresh tiny FLUX (1 double + 1 single block, 4 heads) from the
same seed on gloo ranks, and its trained tensors (LoRA adapters, or every weight for a full
fine-tune), gathered to rank 0 under the serial model's names, are compared with a serial run
of the same config in this process.

Tolerances (per trained tensor, max |strategy - serial| / max |serial|):
- fp32, SGD: 1e-5 for every strategy (DDP, FSDP2, HSDP, tensor, Ulysses, ring, pipeline and the
  hybrids; only the reductions' order differs: measured <= 6e-7 on this host);
- fp32, AdamW: 1e-5 too is not attainable (Adam normalises each gradient element, so the 1e-7
  differences of near-zero elements become visible): max |diff| <= 5% of lr per step;
- bf16 mixed precision (CPU autocast), SGD: 1e-2 (activations are rounded to bf16 after
  matmuls whose fp32 accumulation order depends on the per-rank batch size).
Losses agree to 1e-5 relative. Each test also checks that the serial run moved the weights by
far more than the tolerance.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ditmesh.models.tiny import tiny_flux_transformer, tiny_pipeline
from ditmesh.training.config import TrainConfig
from ditmesh.training.data import CachedLatents, preprocess, read_folder
from ditmesh.training.objective import FLUX, flow_matching_example, flow_matching_loss
from ditmesh.training.shapes import write_shapes_dataset

RESOLUTION, TEXT_LEN = 64, 16
BASE = dict(steps=2, batch_size=4, resolution=RESOLUTION, max_sequence_length=TEXT_LEN, optimizer="sgd", lr=0.5)
LORA = dict(lora_rank=4)
FULL = dict(lora_rank=0)
ADAMW = dict(optimizer="adamw", lr=1e-3)
TOL = 1e-5
BF16_TOL = 1e-2
ADAM_ATOL = 0.05 * ADAMW["lr"]  # per step


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(folder, num_images=32, size=RESOLUTION)
    return folder


@pytest.fixture(scope="session")
def cache(shapes, tmp_path_factory) -> Path:
    """The dataset encoded serially, as `preprocess` does on one rank."""
    folder = tmp_path_factory.mktemp("cache")
    pipe = tiny_pipeline("tiny-flux")
    preprocess(pipe, read_folder(shapes, RESOLUTION), folder, recipe=FLUX, resolution=RESOLUTION,
               max_sequence_length=TEXT_LEN, model_id="tiny-flux", device=torch.device("cpu"))
    return folder


_SERIAL: dict[str, dict] = {}


@pytest.fixture(scope="session")
def serial(cache):
    """``serial(**settings)``: the serial run's result (memoised per settings)."""

    def run(**settings):
        key = repr(sorted(settings.items()))
        if key not in _SERIAL:
            with _one_thread():
                _SERIAL[key] = _train(settings, str(cache))
        return _SERIAL[key]

    return run


class _one_thread:
    """Serial references in this process use one thread, like each rank (a shared 2-core host)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


# ---- rank functions (module level: the pool pickles them) -----------------------------------


def _model(num_layers: int = 1):
    return tiny_flux_transformer(num_layers=num_layers, num_single_layers=num_layers)


def _trainer(settings: dict, cache: str, output: str | None = None, model=None):
    from ditmesh.training.loop import Trainer
    from ditmesh.training.mesh import TrainMesh

    config = TrainConfig(**settings)
    mesh = TrainMesh.build(config) if dist.is_initialized() else None
    return Trainer(config, model or _model(), CachedLatents(cache), mesh=mesh, output=output)


def _train(settings: dict, cache: str) -> dict:
    """Train from scratch; rank 0 returns the trained tensors, the initial ones and the losses."""
    trainer = _trainer(settings, cache)
    initial = trainer.full_state()
    losses = trainer.train()
    return {"state": trainer.full_state(), "initial": initial, "losses": losses}


def _train_interrupted(settings: dict, cache: str, output: str) -> dict:
    """Train one step and checkpoint; then a fresh trainer (new model, new optimizer) resumes
    from the checkpoint and finishes the run."""
    first = _trainer(settings, cache, output)
    first.train_step()
    first.save_checkpoint()
    del first
    second = _trainer(settings, cache, output)
    resumed = second.resume()
    losses = second.train()
    return {"state": second.full_state(), "resumed": resumed, "losses": losses}


# ---- checks ---------------------------------------------------------------------------------


def _rel_diffs(state: dict, reference: dict) -> dict[str, float]:
    assert state.keys() == reference.keys(), sorted(set(state) ^ set(reference))
    return {name: ((state[name] - ref).abs().max() / ref.abs().max()).item() for name, ref in reference.items()}


def _assert_matches(result: dict, reference: dict, tol: float = TOL) -> None:
    diffs = _rel_diffs(result["state"], reference["state"])
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tol, f"{worst}: {diffs[worst]:.2e} > {tol:.0e}"
    moved = max(_rel_diffs(reference["state"], reference["initial"]).values(), default=0.0) if "initial" in reference else 1.0
    assert moved > 100 * tol, f"the serial run barely trained ({moved:.2e}): the comparison would prove nothing"
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=tol, atol=0)


# ---- the objective: the loss falls (first: in-process, while the pools start) ----------------


def _eval_loss(model, dataset, guidance: float) -> float:
    """Loss over the whole dataset with fixed noise and times (micro-steps no training run reaches)."""
    from torch.utils.data import default_collate

    batch = default_collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        losses = [flow_matching_loss(model(**inputs)[0], target)
                  for inputs, target in (flow_matching_example(FLUX, model.config, batch, 10**9 + k, 0, guidance, torch.device("cpu"))
                                         for k in range(2))]
    return torch.stack(losses).mean().item()


@pytest.mark.usefixtures("pools")  # the session's rank pools start in the background meanwhile
def test_loss_decreases(cache):
    with _one_thread():
        trainer = _trainer({**BASE, "lora_rank": 8, "optimizer": "adamw", "lr": 1e-2, "steps": 20}, str(cache))
        before = _eval_loss(trainer.strategy.base, trainer.dataset, trainer.config.guidance)
        losses = trainer.train()
        after = _eval_loss(trainer.strategy.base, trainer.dataset, trainer.config.guidance)
    assert after < 0.9 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5]), losses


# ---- equivalence with the serial run ---------------------------------------------------------

CASES = [  # (world, --parallel, settings)
    (2, "data=2", LORA),
    (2, "data=2", FULL),
    (2, "fsdp=2", FULL),
    (2, "fsdp=2", LORA),
    (2, "tensor=2", FULL),
    (2, "ulysses=2", LORA),
    (2, "ulysses=2", FULL),
    (2, "ring=2", LORA),
    (2, "pipeline=2", LORA),  # 1F1B, 2 microbatches
    (2, "pipeline=2,schedule=gpipe,microbatches=4", FULL),
    (4, "data=4", LORA),
    (4, "fsdp=4", FULL),
    (4, "data=2,fsdp=2", FULL),  # HSDP
    (4, "data=2,tensor=2", FULL),
    (4, "data=2,ulysses=2", LORA),
    (4, "data=2,pipeline=2", FULL),  # the embedders every stage runs: gradients summed over stages
]


@pytest.mark.parametrize("world,parallel,settings", CASES, ids=[f"{p}-{'lora' if s['lora_rank'] else 'full'}" for _, p, s in CASES])
def test_strategy_matches_serial(pools, serial, cache, world, parallel, settings):
    from ditmesh.training.config import parse_parallel

    outs = pools(world).run(_train, {**BASE, **settings, **parse_parallel(parallel)}, str(cache))
    _assert_matches(outs[0], serial(**BASE, **settings))


@pytest.mark.parametrize("parallel,settings", [("data=2", LORA), ("fsdp=2", FULL), ("pipeline=2", FULL)])
def test_gradient_accumulation_matches_serial(pools, serial, cache, parallel, settings):
    """Two micro-steps per optimizer step: DDP's no_sync, FSDP2's deferred reduce-scatter, two schedule runs."""
    from ditmesh.training.config import parse_parallel

    run = {**BASE, **settings, "gradient_accumulation": 2}
    outs = pools(2).run(_train, {**run, **parse_parallel(parallel)}, str(cache))
    _assert_matches(outs[0], serial(**run))


@pytest.mark.parametrize("parallel", ["data=2", "pipeline=2"])
def test_gradient_checkpointing_matches_serial(pools, serial, cache, parallel):
    """Recomputing activations in backward changes nothing: compared with the serial run without it."""
    from ditmesh.training.config import parse_parallel

    settings = {**BASE, **LORA, **parse_parallel(parallel), "gradient_checkpointing": True}
    outs = pools(2).run(_train, settings, str(cache))
    _assert_matches(outs[0], serial(**BASE, **LORA))


@pytest.mark.parametrize("parallel,settings", [("data=2", LORA), ("fsdp=2", FULL)])
def test_adamw_matches_serial(pools, serial, cache, parallel, settings):
    from ditmesh.training.config import parse_parallel

    run = {**BASE, **settings, **ADAMW}
    got = pools(2).run(_train, {**run, **parse_parallel(parallel)}, str(cache))[0]
    ref = serial(**run)
    for name, tensor in ref["state"].items():
        torch.testing.assert_close(got["state"][name], tensor, rtol=0, atol=ADAM_ATOL * run["steps"], msg=lambda m: f"{name}: {m}")


def test_bf16_mixed_precision_matches_serial(pools, serial, cache):
    run = {**BASE, **LORA, "mixed_precision": "bf16"}
    got = pools(2).run(_train, {**run, "data_degree": 2}, str(cache))[0]
    ref = serial(**run)
    assert all(t.dtype == torch.float32 for t in ref["state"].values())  # adapters train in fp32
    diffs = _rel_diffs(got["state"], ref["state"])
    assert max(diffs.values()) <= BF16_TOL, max(diffs.items(), key=lambda kv: kv[1])


# ---- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("world,parallel,settings", [
    (2, "fsdp=2", {**FULL, **ADAMW}),  # sharded optimizer state
    (2, "tensor=2", {**FULL, **ADAMW}),  # DTensor shards, packed layers
    (2, "pipeline=2", LORA),  # per-stage keys
])
def test_checkpoint_resume_matches_uninterrupted(pools, serial, cache, tmp_path, world, parallel, settings):
    from ditmesh.training.config import parse_parallel

    run = {**BASE, **settings}
    got = pools(world).run(_train_interrupted, {**run, **parse_parallel(parallel)}, str(cache), str(tmp_path))[0]
    assert got["resumed"] == 1 and len(got["losses"]) == 1
    ref = serial(**run)
    if run["optimizer"] == "adamw":
        for name, tensor in ref["state"].items():
            torch.testing.assert_close(got["state"][name], tensor, rtol=0, atol=ADAM_ATOL * run["steps"])
    else:
        _assert_matches({**got, "losses": ref["losses"][:1] + got["losses"]}, ref)


def _save_full_model(settings: dict, cache: str, folder: str) -> dict:
    trainer = _trainer(settings, cache)
    trainer.train()
    trainer.save(folder)
    return trainer.full_state()


def test_full_fine_tune_saves_a_diffusers_model(pools, cache, tmp_path):
    from diffusers import FluxTransformer2DModel

    state = pools(2).run(_save_full_model, {**BASE, **FULL, "steps": 1, "fsdp_degree": 2}, str(cache), str(tmp_path))[0]
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, state[name]), name


def test_checkpoint_of_another_run_is_refused(cache, tmp_path):
    with _one_thread():
        trainer = _trainer({**BASE, **LORA, "steps": 1, "checkpoint_every": 1}, str(cache), str(tmp_path))
        trainer.train()
        other = _trainer({**BASE, "lora_rank": 8}, str(cache), str(tmp_path))
    with pytest.raises(ValueError, match=r"different run: lora_rank=4 \(now 8\).*new output folder"):
        other.resume()
    other.start_over()  # what --no-resume does
    assert other.resume() == 0


# ---- noise and batches ----------------------------------------------------------------------


def test_noise_depends_on_example_and_step_only():
    from ditmesh.training.objective import sample_noise_and_time

    noise, t = sample_noise_and_time((4, 8, 8), [3, 7], micro_step=5, seed=0)
    alone, t_alone = sample_noise_and_time((4, 8, 8), [7], micro_step=5, seed=0)
    assert torch.equal(noise[1], alone[0]) and torch.equal(t[1:], t_alone)  # batch mates do not matter
    other, _ = sample_noise_and_time((4, 8, 8), [7], micro_step=6, seed=0)
    assert not torch.equal(other, alone) and ((0 < t) & (t < 1)).all()


def test_batches_are_the_serial_batches_split():
    from ditmesh.training.data import batches

    dataset = [{"index": torch.tensor(i)} for i in range(10)]
    serial_batches = batches(dataset, batch_size=4, batch_rank=0, batch_ranks=1, seed=3)
    shares = [batches(dataset, batch_size=4, batch_rank=r, batch_ranks=2, seed=3) for r in range(2)]
    for step in range(5):  # 2 steps per epoch: crosses epochs
        micro, whole = next(serial_batches)
        split = [next(share) for share in shares]
        assert {m for m, _ in split} == {micro} == {step}
        assert sorted(torch.cat([b["index"] for _, b in split]).tolist()) == sorted(whole["index"].tolist())
    resumed = batches(dataset, batch_size=4, batch_rank=0, batch_ranks=1, seed=3, start=3)
    again = batches(dataset, batch_size=4, batch_rank=0, batch_ranks=1, seed=3)
    for _ in range(3):
        next(again)
    assert torch.equal(next(resumed)[1]["index"], next(again)[1]["index"])


# ---- bad input: ValueError naming the fix, before any process group work ---------------------


@pytest.mark.parametrize("settings,message", [
    (dict(data_degree=2, batch_size=3), r"batch_size 3 does not split over the 2 data x fsdp ranks; use a multiple of 2"),
    (dict(pipeline_degree=2, batch_size=1), r"does not split into 2 microbatches; use batch_size 2"),
    (dict(pipeline_degree=2, microbatches=1, batch_size=2), r"1F1B schedule needs at least as many microbatches .* schedule=gpipe"),
    (dict(microbatches=2, batch_size=2), r"microbatches only apply to pipeline parallelism"),
    (dict(pipeline_degree=2, fsdp_degree=2, batch_size=4), r"pipeline parallelism composes with data only"),
    (dict(ulysses_degree=2, tensor_degree=2, lora_rank=0), r"sequence parallelism .* composes with data only"),
    (dict(tensor_degree=2), r"LoRA under tensor parallelism is not supported.*lora_rank=0"),
    (dict(data_degree=0), r"data_degree must be an integer >= 1"),
    (dict(mixed_precision="fp8"), r"mixed_precision 'fp8' is unknown; use one of no, bf16"),
    (dict(lr=0.0), r"lr must be > 0"),
])
def test_bad_config_is_a_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_parse_parallel():
    from ditmesh.training.config import parse_parallel

    config = TrainConfig.from_parallel("data=2, pipeline=2,microbatches=4,schedule=gpipe", batch_size=8)
    assert (config.data_degree, config.pipeline_degree, config.num_microbatches, config.world_size) == (2, 2, 4, 4)
    assert config.parallel_str() == "pipeline=2,data=2,microbatches=4,schedule=gpipe"
    with pytest.raises(ValueError, match="unknown --parallel key 'cfg' for training; valid keys: pipeline, data, fsdp"):
        parse_parallel("cfg=2")
    with pytest.raises(ValueError, match="needs 4 processes but the world has 2"):
        config.check_world_size(2)


def test_model_checks_name_the_fix():
    from ditmesh.training.loop import check_model

    model = _model()
    with pytest.raises(ValueError, match=r"LoRA target\(s\) to_x match no linear layer .* choose among: .*attn\.to_q"):
        check_model(TrainConfig(lora_targets=("attn.to_q", "to_x")), model)
    with pytest.raises(ValueError, match="tensor_degree 3 .* valid tensor degrees: 1, 2, 4"):
        check_model(TrainConfig(tensor_degree=3, lora_rank=0), model)
    with pytest.raises(ValueError, match="pipeline=3 needs a block per stage but the model has 2 blocks"):
        check_model(TrainConfig(pipeline_degree=3, batch_size=3), model)
    with pytest.raises(ValueError, match="training supports flux models; sd3 is not trainable yet"):
        from ditmesh.models.tiny import tiny_sd3_transformer

        check_model(TrainConfig(), tiny_sd3_transformer())


def test_data_checks_name_the_fix(shapes, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="resolution 60 is not a multiple of 16; use 48 or 64"):
        read_folder(shapes, 60)
    with pytest.raises(ValueError, match=r"32 image\(s\) are smaller than the training resolution 128.*lower --resolution"):
        read_folder(shapes, 128)
    folder = tmp_path / "data"
    shutil.copytree(shapes, folder)
    (folder / "shape_003.txt").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no caption: shape_003.png; write each caption in a .txt"):
        read_folder(folder, RESOLUTION)
    with pytest.raises(ValueError, match="is not a folder; pass a folder of images with captions"):
        read_folder(tmp_path / "missing", RESOLUTION)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* in .*empty; put the training images there"):
        read_folder(tmp_path / "empty", RESOLUTION)
    jsonl = tmp_path / "jsonl"
    write_shapes_dataset(jsonl, num_images=3, captions="jsonl")
    assert [e.caption.startswith("a ") for e in read_folder(jsonl, RESOLUTION)] == [True] * 3
    with pytest.raises(ValueError, match="fewer than batch_size 4; lower --batch-size to at most 3"):
        from ditmesh.training.data import check_dataset_size

        check_dataset_size(3, 4)


# ---- the runner: parallel preprocessing, crash, restart, resume, diffusers-loadable LoRA -----


def test_killed_rank_resumes_from_checkpoint_through_runner(shapes, cache, serial, tmp_path):
    """data=2 LoRA through `DistributedRunner`: SIGKILL rank 1 after step 2's checkpoint,
    `train_on_runner` restarts the ranks and resumes; the LoRA equals an uninterrupted serial
    run's, and diffusers loads it."""
    from ditmesh.runner.runner import DistributedRunner
    from ditmesh.training.worker import TrainingWorker, train_on_runner

    # The tiny-flux pipeline's transformer: 2 double + 4 single blocks (not the 1 + 1 above).
    settings = {**BASE, **LORA, "steps": 6, "checkpoint_every": 2}
    config = TrainConfig(**settings, data_degree=2)
    output = tmp_path / "lora"
    events = []

    def on_event(event):
        events.append(event)
        if event["event"] == "step" and event["step"] == 2 and not any(e["event"] == "restart" for e in events):
            os.kill(runner.pids[1], signal.SIGKILL)

    async def main():
        await runner.start(model="tiny-flux-random", data=str(shapes), output=str(output), config=config, progress_bar=False)
        try:
            return await train_on_runner(runner, on_event=on_event)
        finally:
            await runner.stop()

    runner = DistributedRunner(TrainingWorker, world_size=2, device_type="cpu", num_threads=1)
    result = asyncio.run(main())
    restarts = [e for e in events if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["rank"] == 1, events
    assert result["resumed_from"] >= 2 and result["steps"] == 6, result  # lost at most the steps since step 2
    # The two ranks encoded half the dataset each: the same cache as the serial preprocessing.
    for name in sorted(p.name for p in cache.glob("*.safetensors")):
        from safetensors.torch import load_file

        ours, theirs = load_file(output / "cache" / name), load_file(cache / name)
        for key in theirs:  # fp32; the encoders saw other batch mates (convolution blocking differs)
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5)
    with _one_thread():
        reference = _train_pipeline_model(settings, str(output / "cache"))
    pipe = tiny_pipeline("tiny-flux")
    pipe.load_lora_weights(str(output))
    loaded = {name.replace(".default_0", ".default"): param.detach() for name, param in pipe.transformer.named_parameters()
              if ".lora_" in name}
    assert loaded.keys() == reference["state"].keys()
    diffs = _rel_diffs(loaded, reference["state"])
    assert max(diffs.values()) <= TOL, max(diffs.items(), key=lambda kv: kv[1])
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"][result["resumed_from"]:]), rtol=TOL, atol=0)


def _train_pipeline_model(settings: dict, cache: str) -> dict:
    trainer = _trainer(settings, cache, model=tiny_pipeline("tiny-flux").transformer)
    losses = trainer.train()
    return {"state": trainer.full_state(), "losses": losses}


# ---- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--parallel", "data=2", "--batch-size", "3"], "batch_size 3 does not split over the 2 data x fsdp ranks"),
    (["--lora-targets", "attn.to_q", "to_x"], r"LoRA target\(s\) to_x match no linear layer"),
    (["--resolution", "128"], "smaller than the training resolution 128"),
    (["--parallel", "tensor=3", "--lora-rank", "0"], "valid tensor degrees: 1, 2, 4"),
    (["--parallel", "cfg=2"], "unknown --parallel key 'cfg'"),
])
def test_cli_refuses_bad_input_before_starting_processes(shapes, capsys, extra, message):
    import multiprocessing
    import re

    from ditmesh import cli

    before = set(multiprocessing.active_children())  # the session's rank pools
    assert cli.main(["train", "--data", str(shapes), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert set(multiprocessing.active_children()) <= before


def test_cli_trains_a_lora_diffusers_loads(shapes, tmp_path, capsys):
    from ditmesh import cli

    output = tmp_path / "lora"
    code = cli.main(["train", "--model", "tiny-flux-random", "--data", str(shapes), "--lora-rank", "4", "--steps", "2",
                     "--batch-size", "2", "--max-sequence-length", str(TEXT_LEN), "--device", "cpu", "-o", str(output)])
    assert code == 0
    assert f"wrote {output} (LoRA rank 4, 2 steps, serial: 1 process(es))" in capsys.readouterr().out
    pipe = tiny_pipeline("tiny-flux")
    pipe.load_lora_weights(str(output))
    assert pipe.transformer.peft_config["default_0"].r == 4
