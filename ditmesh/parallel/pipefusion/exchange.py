"""PipeFusion's stage exchange: the point-to-point calls between stages, one batch per tick.

Every transfer of a tick goes into one `batch_isend_irecv` on the pipefusion group, on both the
sender and the receiver (see schedule.py for why that order cannot deadlock). The NCCL rules this
relies on, from ProcessGroupNCCL:

- a batch is one ncclGroupStart/End on the group's communicator: its sends and receives are
  issued together, so a matched exchange inside one batch cannot block itself;
- all operations on one communicator run on one stream per device, in the order posted: a
  receive posted ahead of a send blocks that send until it completes. So the order of batches,
  not just their contents, must match across ranks;
- a lone isend/irecv (not batched) runs on a separate two-rank communicator made at its first
  use, a blocking rendezvous with the peer. There are none here: one group, one communicator.

gloo has none of these rules (each operation is independent and matched by tag), so the tests
check the order with `ditmesh.testing.NcclOrder`, which makes gloo follow them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ditmesh.parallel.pipefusion.schedule import HIDDEN, LATENT, Transfer

_TAGS = {HIDDEN: 1, LATENT: 2}  # gloo matches tags; NCCL ignores them (order alone matches)


class StageExchange:
    """This rank's end of the stage pipeline on the pipefusion group (stage = rank in the group)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)
        self.stage = self.ranks.index(dist.get_rank())
        self._connected = False

    def connect(self, device: torch.device) -> None:
        """Make the group's communicator: the first batch on a group must involve all its ranks
        (torch's rule for batch_isend_irecv), so every rank passes a token around the ring once."""
        if self._connected:
            return
        self._connected = True
        num = len(self.ranks)
        token, inbox = torch.zeros(1, device=device), torch.empty(1, device=device)
        for work in self._batch([(dist.isend, token, (self.stage + 1) % num, 0),
                                 (dist.irecv, inbox, (self.stage - 1) % num, 0)]):
            work.wait()

    def post(self, send: tuple[Transfer, torch.Tensor] | None,
             recv: tuple[Transfer, torch.Tensor] | None) -> list[dist.Work]:
        """Post one tick's transfers of this stage (a send, a receive, or both) as one batch."""
        ops = []
        if send is not None:
            move, tensor = send
            ops.append((dist.isend, tensor, move.dst, _TAGS[move.kind]))
        if recv is not None:
            move, tensor = recv
            ops.append((dist.irecv, tensor, move.src, _TAGS[move.kind]))
        return self._batch(ops) if ops else []

    def _batch(self, ops: list) -> list[dist.Work]:
        return dist.batch_isend_irecv([dist.P2POp(op, tensor, self.ranks[stage], self.group, tag)
                                       for op, tensor, stage, tag in ops])
