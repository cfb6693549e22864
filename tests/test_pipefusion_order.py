"""PipeFusion's P2P order under NCCL's rules, checked on gloo (`ditmesh.testing.NcclOrder`).

gloo matches every send with its receive whatever the order of posts, so the parity tests in
test_pipefusion.py cannot see an order that hangs on GPUs. Here the same tiny pipelines run with
`NcclOrder`, which makes gloo follow ProcessGroupNCCL (one in-order stream per communicator, all of
a rank's communicators serialised in the worst case), and time out where NCCL would hang:

- the static schedule (pipefusion/schedule.py) pairs every transfer in one tick's batch on both
  ends, and a stream simulation of it completes for 2-8 stages;
- the pipelines run through under the checker (2 and 4 stages, exact and stale) and match serial;
- the order shipped up to afd4806 (tests/pipefusion_old_order.py) runs through when each
  communicator is only in order by itself, and matches serial; it deadlocks once a rank's two
  communicators share one queue (NCCL's cross-communicator rule): the hang seen on 2 H200s.
"""

from __future__ import annotations

import contextlib
import math
import time

import pytest
import torch

from ditmesh.parallel.pipefusion import build_items, build_schedule
from ditmesh.plans import Grid
from ditmesh.testing import RankPool

SIZE = 64  # 8x8 latents: 4 token rows for FLUX and SD3
GUIDANCE = {"tiny-flux": 3.5, "tiny-sd3": 5.0}


# ---- the static schedule, as data -----------------------------------------------------------


def _simulate_streams(schedule) -> int:
    """Run every stage's batches on one in-order queue per rank; a batch completes when each of
    its transfers' other end is at the head of its own queue. Returns how many batches ran
    (raises if the queues stall: a deadlock)."""
    queues = [[tick for tick in schedule.program(s) if tick.send or tick.recv] for s in range(schedule.num_stages)]
    ran = 0
    while any(queues):
        heads = {s: queue[0] for s, queue in enumerate(queues) if queue}
        ready = [s for s, head in heads.items()
                 if all(move is None or (other := heads.get(move.dst if move is head.send else move.src)) is not None
                        and move in (other.send, other.recv) for move in (head.send, head.recv))]
        assert ready, f"stalled: heads {heads}"
        for s in ready:
            queues[s].pop(0)
            ran += 1
    return ran


@pytest.mark.parametrize("stages,patches,warmup", [(2, 2, 1), (2, 4, 1), (2, 1, 0), (4, 4, 1), (4, 2, 2), (8, 8, 1), (3, 5, 4)])
def test_schedule_pairs_transfers_and_cannot_stall(stages, patches, warmup):
    steps = range(5)
    items = build_items(steps, warmup, Grid(rows=8, cols=4, unit=1), patches, None)
    schedule = build_schedule(items, stages)
    for tick, move in schedule.transfers():
        sender, receiver = schedule.program(move.src), schedule.program(move.dst)
        assert any(t.tick == tick and t.send == move for t in sender)
        assert any(t.tick == tick and t.recv == move for t in receiver)
    for s in range(stages):  # every stage computes every item once, after its input arrived
        program = schedule.program(s)
        assert [t.compute for t in program if t.compute is not None] == list(range(len(items)))
        arrived = {t.recv.item: t.tick for t in program if t.recv}
        for t in program:
            if t.compute is not None and s > 0:
                assert arrived[t.compute] < t.tick
            if t.compute is not None and s == 0 and schedule.sources[t.compute] is not None:
                assert arrived[schedule.sources[t.compute]] < t.tick
    assert _simulate_streams(schedule) == sum(1 for s in range(stages) for t in schedule.program(s) if t.send or t.recv)


# ---- real pipelines under the checker --------------------------------------------------------


def _run(name: str, config_text: str, steps: int, checked: bool, old_order: bool = False, timeout: float = 60.0,
         device: bool = True) -> dict:
    """On every rank: the images of a parallelized tiny pipeline, or the deadlock the checker saw,
    and the P2P batches this rank posted (by readable group name)."""
    from ditmesh import ParallelConfig, parallelize
    from ditmesh.models.tiny import tiny_pipeline
    from ditmesh.parallel.pipefusion import PipeFusionTransformer
    from ditmesh.testing import NcclOrder, NcclOrderDeadlock
    from pipefusion_old_order import install_old_order

    pipe = parallelize(tiny_pipeline(name), ParallelConfig.parse(config_text))
    wrapper = next(m for m in pipe.transformer.modules() if isinstance(m, PipeFusionTransformer))  # under cfg's wrapper
    if old_order:
        install_old_order(wrapper)
    stage = wrapper._stage
    order = NcclOrder(timeout=timeout, device=device)
    names = {stage.group.group_name: "forward"}
    if old_order:
        names[stage.return_group.group_name] = "return"
    result = {}
    try:
        with torch.no_grad(), order if checked else contextlib.nullcontext():
            result["images"] = pipe(prompt="a red cube", num_inference_steps=steps, height=SIZE, width=SIZE,
                                    output_type="pt", guidance_scale=GUIDANCE[name],
                                    generator=torch.Generator().manual_seed(0)).images
    except NcclOrderDeadlock as error:
        result["deadlock"] = _rename(str(error), names)
    result["log"] = {_rename(f"({key}, ", names)[1:-2]: [_rename(entry, names) for entry in entries]
                     for key, entries in order.log.items()}
    return result


def _rename(entry: str, names: dict[str, str]) -> str:
    for name, readable in names.items():
        entry = entry.replace(f"({name}, ", f"({readable}, ")
    return entry


_SERIAL: dict[tuple[str, int], torch.Tensor] = {}


def _serial(name: str, steps: int) -> torch.Tensor:
    if (name, steps) not in _SERIAL:
        from ditmesh.models.tiny import tiny_pipeline

        with torch.no_grad():
            _SERIAL[name, steps] = tiny_pipeline(name)(
                prompt="a red cube", num_inference_steps=steps, height=SIZE, width=SIZE, output_type="pt",
                guidance_scale=GUIDANCE[name], generator=torch.Generator().manual_seed(0)).images
    return _SERIAL[name, steps]


def _psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = torch.mean((image - reference) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("world,name,config", [
    (2, "tiny-flux", "pipefusion=2,warmup_steps=3"),
    (2, "tiny-flux", "pipefusion=2,pipefusion_patches=4,warmup_steps=1"),
    (4, "tiny-sd3", "pipefusion=4,warmup_steps=1"),
    (4, "tiny-sd3", "pipefusion=2,cfg=2,warmup_steps=1"),
])
def test_pipeline_runs_under_nccl_order(pools, world, name, config):
    steps = 3
    # timeout: the first job on a fresh pool imports diffusers on every rank (slow on a loaded host).
    results = pools(world).run(_run, name, config, steps, True, timeout=170.0)
    for result in results:
        assert "deadlock" not in result, result["deadlock"]
    log = results[0]["log"]["device"]
    print(f"\n{name} {config}: rank 0 posted {len(log)} batches: {log[:4]} ...")
    image = results[0]["images"]
    if "warmup_steps=3" in config:  # all warm-up: exact
        torch.testing.assert_close(image, _serial(name, steps), atol=1e-4, rtol=0)
    else:  # stale, as in test_pipefusion.py
        assert 30 < _psnr(image, _serial(name, steps)) < math.inf


def test_old_order_runs_on_gloo_but_deadlocks_under_nccl_order():
    # The case: pipefusion=2 on two ranks. Its pipefusion group is the world group there,
    # whose gloo pairs a timed-out wait closes: so a pool of its own, not the shared one.
    name, config, steps = "tiny-flux", "pipefusion=2,warmup_steps=2", 2
    with RankPool(2) as pool:
        started = time.perf_counter()
        per_group = pool.run(_run, name, config, steps, True, True, 5.0, False)  # one stream per communicator only
        checked = pool.run(_run, name, config, steps, True, True, 5.0)  # all of a rank's communicators in one queue
        print(f"\nold order: both runs took {time.perf_counter() - started:.1f} s")
    # gloo runs it, and so would NCCL if each communicator ran on its own: the order of each
    # group's batches matches on both ranks (rank r's log, per group).
    torch.testing.assert_close(per_group[0]["images"], _serial(name, steps), atol=1e-4, rtol=0)
    for rank, result in enumerate(per_group):
        print(f"old order, one stream per communicator, rank {rank}: {result['log']}")
    for rank, result in enumerate(checked):
        log = result["log"]["device"]
        print(f"\nold order, rank {rank}: " + "; ".join(log) + f"\n  -> {result.get('deadlock', 'ran through')}")
    assert all("deadlock" in result for result in checked), "the old order must hang under NCCL's rules"
    # Rank 0 queued the return receive ahead of its first forward send; rank 1 the forward
    # receive ahead of its return send: the two communicators are posted to in crossed orders.
    assert "recv <- 1 (return" in checked[0]["log"]["device"][2]
    assert "send -> 1 (forward" in checked[0]["log"]["device"][3]
    assert "recv <- 0 (forward" in checked[1]["log"]["device"][2]
