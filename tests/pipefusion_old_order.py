"""The P2P order PipeFusion shipped up to afd4806 (hung on 2 H200s), kept to prove the NCCL-order
checker catches it: `OldOrderStage` replaces a wrapper's stage and runs that exchange on the same
blocks and `Stage.compute`.

Its order, per rank: the latent coming back from the last stage travels on a second group with
the same ranks ("return"); stage 0 posts the receive for it before its first forward send, and
every other stage posts its first forward receive before it sends anything back. The code below
is afd4806's `_Stage` exchange (run, the two inbox generators, `_p2p`), unchanged but for names.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ditmesh.parallel.pipefusion import PipeFusionTransformer, Stage

_HIDDEN_TAG, _LATENT_TAG = 1, 2


def install_old_order(wrapper: PipeFusionTransformer) -> None:
    """Make `wrapper` run the old exchange (collective: every rank of the world, one pipefusion group)."""
    stage = wrapper._stage
    ranks = dist.get_process_group_ranks(stage.group)
    assert ranks == list(range(dist.get_world_size())), "the old order's return group is made for one pipeline"
    return_group = dist.new_group(ranks)  # what ParallelMesh built as "pipefusion_return"
    wrapper._stage = OldOrderStage(stage, return_group)


class OldOrderStage(Stage):
    """afd4806's `_Stage`: lone-batch P2P on a forward group and a return group, inbox generators."""

    def __init__(self, stage: Stage, return_group: dist.ProcessGroup):
        self.__dict__.update(stage.__dict__)
        self.return_group = return_group
        ranks = dist.get_process_group_ranks(self.group)
        self.prev_rank, self.next_rank = ranks[self.stage - 1], ranks[(self.stage + 1) % self.num_stages]
        self._connected = False

    def _connect(self, device: torch.device) -> None:
        if self._connected:
            return
        self._connected = True
        for group in (self.group, self.return_group):
            token, inbox = torch.zeros(1, device=device), torch.empty(1, device=device)
            ops = [dist.P2POp(dist.isend, token, self.next_rank, group), dist.P2POp(dist.irecv, inbox, self.prev_rank, group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def run(self, items, step_kwargs, latent, update, hidden_shape, times):
        self._connect(latent.device)
        latent = latent.clone()
        dtype = self.model.dtype
        inbox = self._latent_inbox(items, latent) if self.first else self._hidden_inbox(items, dtype, hidden_shape)
        sends = []
        outputs = []
        text = self.plan.embed_text(self.model, step_kwargs(items[0].step)) if self.first else None
        for item in items:
            tic = time.perf_counter()
            received = next(inbox)
            tac = time.perf_counter()
            result = self.compute(item, step_kwargs(item.step), received, latent, text)
            if self.last:
                region = item.patch.latent(self.plan.latent_row_dim)
                prediction, latent[region] = update(result, item.step, item, latent[region])
                outputs.append((item, prediction))
                if item.step < items[-1].step:
                    sends.append(_p2p(dist.isend, latent[region].contiguous(), self.next_rank, self.return_group, _LATENT_TAG))
            else:
                sends.append(_p2p(dist.isend, result.contiguous(), self.next_rank, self.group, _HIDDEN_TAG))
            sends = [work for work in sends if not work.is_completed()]
            times.items.append((item.step, item.patch.row_start, tac - tic, time.perf_counter() - tac))
        for work in sends:
            work.wait()
        return outputs

    def _hidden_inbox(self, items, dtype, shape):
        device = next(self.model.parameters()).device

        def post(index: int):
            return self._post(shape(self.local(items[index].patch)), self.prev_rank, _HIDDEN_TAG, dtype, device)

        pending = post(0)
        for index in range(len(items)):
            buf, work = pending
            work.wait()
            more = index + 1 < len(items)
            if more and self.last:
                pending = post(index + 1)
            yield buf
            if more and not self.last:
                pending = post(index + 1)

    def _latent_inbox(self, items, latent):
        dim = self.plan.latent_row_dim
        messages = [(it.step + 1, it.patch) for it in items if it.step < items[-1].step]
        posted = iter(messages)
        pending = self._post_latent(next(posted, None), latent)
        done_rows = {items[0].step: items[0].patch.grid.rows}
        for item in items:
            while done_rows.get(item.step, 0) < item.patch.row_stop:
                (step, patch), buf, work = pending
                work.wait()
                latent[patch.latent(dim)] = buf
                done_rows[step] = patch.row_stop
                pending = self._post_latent(next(posted, None), latent)
            yield latent[item.patch.latent(dim)].clone()

    def _post_latent(self, message, latent):
        if message is None:
            return None
        step, patch = message
        shape = latent[patch.latent(self.plan.latent_row_dim)].shape
        buf, work = self._post(shape, self.last_rank, _LATENT_TAG, latent.dtype, latent.device, self.return_group)
        return (step, patch), buf, work

    def _post(self, shape, src, tag, dtype, device, group=None):
        buf = torch.empty(shape, dtype=dtype, device=device)
        return buf, _p2p(dist.irecv, buf, src, group or self.group, tag)


def _p2p(op, tensor, peer, group, tag):
    return dist.batch_isend_irecv([dist.P2POp(op, tensor, peer, group, tag)])[0]
