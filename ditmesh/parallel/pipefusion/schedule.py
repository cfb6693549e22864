"""PipeFusion's static schedule: which stage computes which item at which tick, and what moves.

Pure planning (no torch.distributed): every rank builds the same schedule from the same items, so
the P2P calls it implies are known on both ends of every transfer before anything is posted.

Ticks are logical time. At tick t a stage computes at most one item, then posts the transfers of
tick t as one batch: what it just computed (activations to the next stage, or from the last
stage the updated latent patch back to stage 0) and what its neighbour computed at tick t. An
item runs on stage s at the first tick after both its input (from stage s-1, or for stage 0 the
latent rows of the previous step, from the last stage) and stage s's previous item are done:

    tick[s][i] = max(tick[s][i-1], tick[s-1][i]) + 1           (stage s > 0)
    tick[0][i] = max(tick[0][i-1], tick[last][source(i)]) + 1  (stage 0; source: the previous
                                                                step's item it needs back)

Why this cannot deadlock under NCCL (one stream per communicator, its operations run in the
order posted, a batch ends when all its peers' matching operations have run): each rank posts
one batch per tick it takes part in, in tick order, all on one group; a transfer is in its
sender's and its receiver's batch of the same tick. A batch of tick t waits only for compute of
ticks <= t, which waits only for batches of ticks < t. So once every batch before tick t has
completed, every batch of tick t is at the head of its rank's stream and they complete together.
The same holds if the communicator's kernels serialise with the stage's other collectives
(Ulysses' all-to-all, cfg's all-gather): those run inside the tick's compute, on every rank in
tick order too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditmesh.parallel.pipefusion.stages import patch_rows
from ditmesh.plans import Grid, Patch

HIDDEN, LATENT = "hidden", "latent"


@dataclass(frozen=True)
class Item:
    """One unit of stage work: a patch (or the whole image, in warm-up) at one diffusion step."""

    step: int
    patch: Patch


@dataclass(frozen=True)
class Transfer:
    """One tensor moving between stages at a tick: `kind` HIDDEN (the [text, image] tokens of item
    `item`, stage `src` -> `src` + 1) or LATENT (item's updated latent rows, last stage -> 0)."""

    kind: str
    item: int
    src: int
    dst: int


@dataclass(frozen=True)
class Tick:
    """What one stage does at one tick: compute an item (or not), then one batch of `send` / `recv`."""

    tick: int
    compute: int | None = None
    send: Transfer | None = None
    recv: Transfer | None = None


@dataclass(frozen=True)
class Schedule:
    """The whole pipeline's plan for one trajectory; `program(stage)` is one rank's part."""

    items: tuple[Item, ...]
    num_stages: int
    ticks: tuple[tuple[int, ...], ...]
    """ticks[s][i]: the tick at which stage s computes item i."""
    sources: tuple[int | None, ...]
    """sources[i]: the last item of the previous step whose latent rows item i needs (None at the first step)."""

    @property
    def num_ticks(self) -> int:
        return self.ticks[-1][-1] + 1

    def transfers(self) -> list[tuple[int, Transfer]]:
        """(tick, transfer) for every tensor that moves, in tick order."""
        last, final_step = self.num_stages - 1, self.items[-1].step
        moves = []
        for s in range(self.num_stages):
            for i, tick in enumerate(self.ticks[s]):
                if s < last:
                    moves.append((tick, Transfer(HIDDEN, i, s, s + 1)))
                elif self.items[i].step < final_step:  # back to stage 0 for the next step
                    moves.append((tick, Transfer(LATENT, i, last, 0)))
        return sorted(moves, key=lambda move: move[0])

    def program(self, stage: int) -> list[Tick]:
        """Stage `stage`'s ticks in order (idle ones left out): each rank runs exactly this."""
        ticks: dict[int, dict] = {}
        for i, tick in enumerate(self.ticks[stage]):
            ticks.setdefault(tick, {})["compute"] = i
        for tick, move in self.transfers():
            if move.src == stage:
                ticks.setdefault(tick, {})["send"] = move
            if move.dst == stage:
                ticks.setdefault(tick, {})["recv"] = move
        return [Tick(tick, **ticks[tick]) for tick in sorted(ticks)]


def build_items(steps: range, warmup_steps: int, grid: Grid, num_patches: int, height: int | None) -> list[Item]:
    """The items of a trajectory in order: warm-up steps whole, then `num_patches` bands per step."""
    bands = patch_rows(grid.rows, num_patches, height)
    whole = Patch(0, grid.rows, grid)
    items = []
    for step in steps:
        if step - steps.start < warmup_steps:
            items.append(Item(step, whole))
        else:
            items += [Item(step, Patch(start, stop, grid)) for start, stop in bands]
    return items


def build_schedule(items: list[Item], num_stages: int) -> Schedule:
    """Ticks of every item on every stage (module docstring); the same on every rank."""
    sources = _latent_sources(items)
    last = num_stages - 1
    ticks: list[list[int]] = [[] for _ in range(num_stages)]
    for i in range(len(items)):
        for s in range(num_stages):
            ready = ticks[s][i - 1] + 1 if i else 0
            if s > 0:
                ready = max(ready, ticks[s - 1][i] + 1)
            elif sources[i] is not None:
                ready = max(ready, ticks[last][sources[i]] + 1)
            ticks[s].append(ready)
    return Schedule(tuple(items), num_stages, tuple(map(tuple, ticks)), tuple(sources))


def _latent_sources(items: list[Item]) -> list[int | None]:
    """For each item, the last item of the previous step that overlaps its rows (the rows are
    updated in item order, so when that one is back every row the item reads is)."""
    sources = []
    for i, item in enumerate(items):
        previous = [j for j in range(i) if items[j].step == item.step - 1 and items[j].patch.row_start < item.patch.row_stop]
        sources.append(previous[-1] if previous else None)
    return sources
