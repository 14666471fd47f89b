"""Transport over a torch.distributed ProcessGroup: Gloo on CPU, NCCL for CUDA tensors.

Peers are global ranks of the wrapped (world) group. Sub-groups for native collectives
are created on first use with `use_local_synchronization=True`, so only their members
take part, and cached for the life of the transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from .base import CollectiveTimeoutError, Handle, NativeCall, Transport, TransportError

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "prod": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
}


class _WorkHandle(Handle):
    """Gloo's send/recv work only completes in `wait()`, so this handle is blocking."""

    blocking = True

    def __init__(self, work: dist.Work, what: str) -> None:
        self.work = work
        self.what = what
        self.done = False

    def wait(self, timeout: float) -> None:
        if self.done:
            return
        try:
            self.work.wait(timedelta(seconds=max(timeout, 0.001)))
        except RuntimeError as exc:
            if "imed out" in str(exc) or "imeout" in str(exc):
                raise CollectiveTimeoutError(f"{self.what} timed out: {exc}") from exc
            raise TransportError(f"{self.what} failed: {exc}") from exc
        self.done = True

    def test(self) -> bool:
        if self.done:
            return True
        if self.work.is_completed():
            try:
                self.work.wait()
            except RuntimeError as exc:
                raise TransportError(f"{self.what} failed: {exc}") from exc
            self.done = True
        return self.done

    def describe(self) -> str:
        return self.what


class TorchPGTransport(Transport):
    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        super().__init__(dist.get_rank(self.group), dist.get_world_size(self.group))
        self.name = dist.get_backend(self.group)
        self._subgroups: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        work = self.group.send([tensor], peer, tag)
        return _WorkHandle(work, f"{self.name} send to rank {peer}")

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        work = self.group.recv([tensor], peer, tag)
        return _WorkHandle(work, f"{self.name} recv from rank {peer}")

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def subgroup(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        if len(ranks) == self.world_size:
            return self.group
        group = self._subgroups.get(ranks)
        if group is None:
            group = dist.new_group(list(ranks), backend=self.name,
                                   use_local_synchronization=True)
            self._subgroups[ranks] = group
        return group

    def native(self, call: NativeCall) -> None:
        group = self.subgroup(call.group)
        if call.collective == "all_reduce":
            dist.all_reduce(call.dst, op=_REDUCE_OPS[call.op], group=group)
        elif call.collective == "broadcast":
            dist.broadcast(call.dst, src=call.group[call.root], group=group)
        elif call.collective == "all_gather":
            outs = list(call.dst.split(list(call.counts)))
            dist.all_gather(outs, call.src, group=group)
        elif call.collective == "reduce_scatter":
            self._reduce_scatter(call.dst, call.src, list(call.counts), call.op, group)
        else:
            raise TransportError(f"{self.name}: no native {call.collective}")

    def _reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, counts: list[int],
                        op: str, group: dist.ProcessGroup) -> None:
        if len(set(counts)) == 1 and self.name != "gloo":
            dist.reduce_scatter_tensor(out, inp, op=_REDUCE_OPS[op], group=group)
            return
        # Gloo has no reduce-scatter: all-reduce a copy and keep our block.
        full = inp.clone()
        dist.all_reduce(full, op=_REDUCE_OPS[op], group=group)
        me = dist.get_rank(group)
        start = sum(counts[:me])
        out.copy_(full[start:start + counts[me]])

    def native_all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        if op == "avg":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            tensor.div_(self.world_size)
        else:
            dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=self.group)

    def native_all_to_all_v(self, out: torch.Tensor, inp: torch.Tensor,
                            out_splits: Sequence[int], in_splits: Sequence[int]) -> None:
        dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=self.group)

    def native_reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
        counts = [out.numel()] * self.world_size
        self._reduce_scatter(out, inp, counts, "sum" if op == "avg" else op, self.group)
        if op == "avg":
            out.div_(self.world_size)

    def native_all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        dist.all_gather_into_tensor(out, inp, group=self.group)

    def version(self) -> str:
        return f"torch {torch.__version__} {self.name}"
