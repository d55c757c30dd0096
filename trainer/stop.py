"""Stop a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, torchrun's shutdown).

    with GracefulStop(rank, world_size) as stop:
        for step in ...:
            train_step()
            if stop.requested():          # at the step boundary, the same answer on every rank
                save_checkpoint(); break
    exit_code = 128 + stop.signum         # 130 for SIGINT, 143 for SIGTERM

The handler only records the signal; the loop asks at each step boundary. Under torchrun the ranks may see the
signal at different steps, so requested() all-reduces the flag (MAX) over a gloo group: a CPU collective of one
int per step, which never waits for the GPU. A second SIGINT more than 2 s after the first stops at once
(KeyboardInterrupt, nothing saved); within 2 s it is taken as the copy torchrun forwards of the terminal's.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_AFTER_S = 2.0


class GracefulStop:
    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.signum = 0  # the first signal received (0: none); after requested(), the ranks' agreed one
        self._since = 0.0
        self._previous = {}
        self._group = None

    def __enter__(self) -> "GracefulStop":
        if self.world_size > 1:
            self._group = dist.new_group(backend="gloo")  # collective: every rank enters together
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _handle(self, signum, frame) -> None:
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self._since > FORCE_AFTER_S:
                raise KeyboardInterrupt
            return
        self.signum, self._since = signum, time.monotonic()
        if self.rank == 0:  # os.write: print() could re-enter a buffered write the signal interrupted
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                        f"(Ctrl-C again to stop at once, without saving)\n".encode())

    def requested(self) -> int:
        """The signal to stop for, agreed by all ranks (0: go on). Every rank calls it at every step boundary."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.signum = int(flag)
        return self.signum
