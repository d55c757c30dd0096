"""Point-to-point plumbing for ring schedules: send to the next rank, receive from the previous one.

    comm = RingComm(group)
    next_k = comm.send_recv(k)     # queue isend(k -> rank+1) and irecv(<- rank-1); returns the receive buffer
    comm.commit()                  # launch all queued ops as one batch (dist.batch_isend_irecv)
    ...compute on k...
    comm.wait()                    # next_k is now valid
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class RingComm:
    """Batched isend/irecv around the ring of `process_group` (None = the default group)."""

    def __init__(self, process_group=None):
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        # P2P ops address *global* ranks even when they name a subgroup.
        self.send_rank = dist.get_global_rank(self.group, (self.rank + 1) % self.world_size)
        self.recv_rank = dist.get_global_rank(self.group, (self.rank - 1) % self.world_size)
        self._ops: list = []
        self._reqs: Optional[list] = None
        self._inflight: list = []

    def send_recv(self, to_send: torch.Tensor, recv_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Queue sending `to_send` to rank+1 and receiving a tensor of the same shape from rank-1."""
        if self._reqs is not None:
            raise RuntimeError("RingComm.send_recv called while a committed batch is in flight; call wait() first")
        to_send = to_send.contiguous()
        buf = torch.empty_like(to_send) if recv_tensor is None else recv_tensor
        if buf.shape != to_send.shape or buf.dtype != to_send.dtype or not buf.is_contiguous():
            raise ValueError(f"RingComm.send_recv: recv_tensor {tuple(buf.shape)} {buf.dtype} must be contiguous "
                             f"and match to_send {tuple(to_send.shape)} {to_send.dtype}")
        self._ops.append(dist.P2POp(dist.isend, to_send, self.send_rank, group=self.group))
        self._ops.append(dist.P2POp(dist.irecv, buf, self.recv_rank, group=self.group))
        return buf

    def commit(self) -> None:
        if self._reqs is not None:
            raise RuntimeError("RingComm.commit called twice without wait")
        if not self._ops:
            raise RuntimeError("RingComm.commit called with nothing queued; call send_recv first")
        self._reqs = dist.batch_isend_irecv(self._ops)
        # Keep the buffers referenced until wait(): a temporary from .contiguous() must outlive the send.
        self._inflight, self._ops = self._ops, []

    def wait(self) -> None:
        if self._reqs is None:
            raise RuntimeError("RingComm.wait called before commit")
        for req in self._reqs:
            req.wait()
        self._reqs, self._inflight = None, []
