"""PipeFusion planning: blocks into stages (balanced by cost), image rows into patches."""

from __future__ import annotations

from torch import nn

from ditmesh.plans import StagePlan


def split_stages(costs: list[float], num_stages: int) -> list[range]:
    """Contiguous split of blocks with `costs` into `num_stages` ranges minimising the costliest stage."""
    n = len(costs)
    if n < num_stages:
        raise ValueError(f"the model has {n} blocks, fewer than pipefusion={num_stages} stages; use pipefusion <= {n}")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[k][j]: smallest max-stage cost splitting blocks [0, j) into k stages; cut[k][j] the last cut.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [n], n
    for k in range(num_stages, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    bounds.reverse()
    return [range(bounds[k], bounds[k + 1]) for k in range(num_stages)]


def patch_rows(num_rows: int, num_patches: int, height: int | None = None) -> list[tuple[int, int]]:
    """Split `num_rows` token rows into `num_patches` bands as even as possible: [(start, stop)]."""
    if num_patches > num_rows:
        where = f"height {height} gives" if height else "the image has"
        raise ValueError(
            f"{where} {num_rows} token rows; pipefusion_patches must be <= {num_rows} (got {num_patches})"
        )
    base, extra = divmod(num_rows, num_patches)
    bounds, start = [], 0
    for p in range(num_patches):
        stop = start + base + (1 if p < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _block_costs(model: nn.Module, plan: StagePlan) -> list[float]:
    costs = []
    for attr, cost in zip(plan.blocks, plan.block_costs):
        costs += [cost] * len(getattr(model, attr))
    return costs


def keep_stage(model: nn.Module, plan: StagePlan, stage: int, num_stages: int) -> list[nn.Module]:
    """Drop every block (and embedder/head) this stage does not run; return its blocks in order.

    Afterwards the model holds only this stage's weights: `nn.ModuleList`s of the local blocks.
    """
    local = split_stages(_block_costs(model, plan), num_stages)[stage]
    blocks, index = [], 0
    for attr in plan.blocks:
        kept = []
        for block in getattr(model, attr):
            if index in local:
                kept.append(block)
            index += 1
        setattr(model, attr, nn.ModuleList(kept))
        blocks += kept
    dropped = (plan.first_stage_modules if stage > 0 else ()) + (plan.last_stage_modules if stage < num_stages - 1 else ())
    for name in dropped:
        setattr(model, name, None)
    return blocks
