"""Step caching inside PipeFusion's stages: the `static` policy, one residual per stage and patch.

A cached step of the serial cache (`ditmesh/parallel/cache.py`) runs the first block, then adds
the residual the other blocks produced at the last computed step (``last block output - first
block output``). Under PipeFusion the blocks are split over stages, so each stage keeps its own
part of that residual, per patch, saved at the last step that computed the patch:

- stage 0: ``R0 = stage 0 output - first block output`` (a cached step runs the first block,
  then adds R0);
- stage k > 0: ``Rk = stage k output - stage k input`` (a cached step adds Rk, no block runs);
- likewise for the text stream where the stage carries it.

The residuals telescope: ``first(x) + R0 + R1 + ... = first(x) + (last block output - first
block output)`` at the last computed step, the serial cached step. With every step a PipeFusion
warm-up step (exact mode) the image is the serial cached image. ``taylor=1`` extrapolates each
stage's residual from its last two computed steps, with the serial factor; linear, so the sum
still telescopes.

Only the static schedule: every rank knows before the trajectory which steps compute, so the
decision is the same on every stage by construction and the P2P schedule keeps its shape (a
cached item is received, computed cheaply and sent on like a computed one). fbcache is refused
(`cache.check`): its decision needs the first block's statistic over the whole image of step t
before any later block of step t runs, but PipeFusion's patches of step t reach stage 0 one by
one while the earlier patches already run on later stages; waiting for the decision would drain
the pipeline at every step.

After warm-up the items are patches: a patch whose last computed step was a warm-up step (the
whole image) reads its rows of the whole image's residual (under Ulysses inside the stage, each
rank all-gathers the whole image's residual over its sequence group once, at that item; every
rank of the group computes the same items, so all of them reach it). The stale K/V buffers of
the blocks a cached item skips keep their last computed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed._functional_collectives as funcol

from ditmesh.config import CacheConfig
from ditmesh.plans import Patch

CACHE_HANDLE = "_ditmesh_step_cache"  # the attribute cache.apply sets on the denoiser (its `_HANDLE_ATTR`)

Blocks = Callable[[list, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]
"""(blocks, text, image) -> (text, image) after running `blocks` in order on one item."""


@dataclass
class _Saved:
    """One patch's residuals on this stage (this rank's tokens), from one computed step."""

    image: torch.Tensor
    text: torch.Tensor | None
    step: int


@dataclass(eq=False)
class StageCache:
    """The static step cache of one rank's PipeFusion stage, and its computed-step report.

    `PipeFusionTransformer` calls `begin` at each trajectory and `run` for each item;
    `CachedPipeline` calls `start`/`end_step` around each pipeline call and reads `computed`."""

    config: CacheConfig
    computed: list[int] = field(default_factory=list)
    """Steps (0-based within the call) the last trajectory computed in full; the others were cached."""
    in_pipeline: bool = False
    _first_step: int = field(default=0, init=False)
    _bands: tuple[Patch, ...] = field(default=(), init=False)  # the trajectory's patches after warm-up
    _saved: dict[tuple[int, int], list[_Saved]] = field(default_factory=dict, init=False)  # rows -> [older, newest]

    # ---- CachedPipeline's interface -----------------------------------------------------------

    def start(self) -> None:
        self.computed, self.in_pipeline = [], True

    def end_step(self) -> None:
        """The step's work was done by the trajectory (at its first step)."""

    # ---- one trajectory --------------------------------------------------------------------------

    def begin(self, steps: range, patches: list[Patch]) -> None:
        """A trajectory over `steps` starts, with these item patches: forget the saved residuals."""
        self._first_step, self._saved = steps.start, {}
        self._bands = tuple({(p.row_start, p.row_stop): p for p in patches if p.num_tokens != p.grid.rows * p.grid.cols}.values())
        self.computed = [step - steps.start for step in steps if self.computes(step)]

    def computes(self, step: int) -> bool:
        """Whether the static schedule computes `step` (the same on every rank)."""
        index = step - self._first_step
        return index == 0 or self.config.scheduled(index)

    def run(self, step: int, patch: Patch, first: bool, blocks: list, text: torch.Tensor | None, image: torch.Tensor,
            call: Blocks, sequence_group: Any = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """This stage's blocks on item (`step`, `patch`, as this rank holds it): all of them at a
        computed step (saving the stage's residual), else stage 0's first block (on stage 0) and
        the saved residual. Returns (text, image) as the stage's blocks would."""
        head, rest = (blocks[:1], blocks[1:]) if first else ([], blocks)
        text, image = call(head, text, image)
        if self.computes(step):
            out_text, out_image = call(rest, text, image)
            text_residual = None if out_text is None or text is None else out_text - text
            self._save(step, patch, out_image - image, text_residual, sequence_group)
            return out_text, out_image
        return self._add(step, patch, text, image)

    def _save(self, step: int, patch: Patch, image: torch.Tensor, text: torch.Tensor | None, sequence_group: Any) -> None:
        self._keep(patch, _Saved(image, text, step))
        whole = patch.num_tokens == patch.grid.rows * patch.grid.cols
        if not whole or not self._bands:
            return
        # Warm-up item (the whole image) and patches later: each band reads its rows of it.
        if patch.num_shards > 1:  # this rank holds shard `patch.shard` of the tokens: gather them all
            image = funcol.wait_tensor(funcol.all_gather_tensor(image.contiguous(), 1, sequence_group))
        for band in self._bands:
            local = Patch(band.row_start, band.row_stop, band.grid, patch.shard, patch.num_shards).local_tokens
            self._keep(band, _Saved(image[:, local], text, step))

    def _keep(self, patch: Patch, saved: _Saved) -> None:
        history = self._saved.setdefault((patch.row_start, patch.row_stop), [])
        history[:] = history[-1:] + [saved]

    def _add(self, step: int, patch: Patch, text: torch.Tensor | None, image: torch.Tensor) -> tuple:
        *older, last = self._saved[(patch.row_start, patch.row_stop)]
        res_image, res_text = last.image, last.text
        if self.config.taylor and older:
            # First-order Taylor, as cache.py: r(step) ~ r(s1) + (r(s1) - r(s0)) (step - s1) / (s1 - s0).
            factor = (step - last.step) / (last.step - older[0].step)
            res_image = res_image + factor * (res_image - older[0].image)
            if res_text is not None and older[0].text is not None:
                res_text = res_text + factor * (res_text - older[0].text)
        return (None if text is None or res_text is None else text + res_text), image + res_image

