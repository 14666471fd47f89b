"""Refusing bad collective calls before any data moves, with the same error on every rank.

Why this exists: a collective whose ranks disagree does not fail cleanly by itself. Sends
and receives of different lengths desynchronise a shared-memory ring or a Gloo pair, so
the job returns wrong numbers, hangs, or dies in C++ (torch's own Gloo backend handles
only two of five such mistakes). We therefore check every call in two layers:

1. **Local checks** (the pure functions below), on every call: dtype, device, contiguity,
   op/dtype pair, tensor size relations, split sizes (entries, integers, sign, sum).
   Microseconds; nothing is sent.
2. **A cross-rank check** (`Agreement`): every rank contributes a small fixed-size
   signature of its call (collective, dtype, element count, op, root, elements per row,
   the algorithm it chose, device type, and its own local refusal if it has one) and every
   rank compares all of them. A mistake on one rank thus becomes the same `CollectiveError`
   on every rank, naming the rank(s) that differ and what differs, instead of a hang. For
   all-to-all-v a second gather of every rank's send and receive split sizes checks that
   what rank i sends to j is what j expects from i. The exchange is our own small
   all-gather over the communicator's transports, so it is bounded by its timeout.

The cross-rank check runs on the first call of each signature per communicator and is
then a dict lookup (the fast path); with `TOPOCOLL_DEBUG=1` (set on every rank) it runs on
every call. An all-to-all-v signature leaves out the row counts (MoE dispatch changes them
every step), so its split check reruns only where the algorithm gathers the split matrix
anyway (`bruck`, `hierarchical_2d`) or under `TOPOCOLL_DEBUG=1`.

The limit of a cache: a mistake that first appears in a call whose signature the other
ranks have already checked (their call looks familiar, only the bad rank's differs) is
refused on the rank that can see it, and the others fail with the communicator's timeout
instead; run with `TOPOCOLL_DEBUG=1` to turn those into clear errors too.
"""

from __future__ import annotations

import json
import operator
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .ops import UnsupportedOpError, check_op

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
}

# Device types each transport can move (by `Transport.name`); a transport may declare its
# own with a `devices` attribute. Unknown transports are assumed to move both.
TRANSPORT_DEVICES: dict[str, tuple[str, ...]] = {
    "shm": ("cpu",), "mpi": ("cpu",), "ucx": ("cpu",), "gloo": ("cpu", "cuda"),
    "nccl": ("cuda",),
}

SIGNATURE_BYTES = 1024
"""Fixed size of one rank's signature on the wire, so ranks in different calls still
exchange the same number of bytes (and learn that they differ instead of desynchronising)."""

CHECK_CACHE_SIZE = 4096


class CollectiveError(ValueError):
    """A collective call that cannot be run as given; names rank, collective and problem."""


class MismatchError(CollectiveError):
    """Ranks called a collective with arguments that do not fit together (sizes, dtypes,
    split sizes, ops, algorithms, roots, devices); raised on every rank."""


class Signature(NamedTuple):
    """What every rank must agree on for one call (a NamedTuple: cheap to build and hash,
    since it is also the cache key of the fast path)."""

    collective: str
    dtype: torch.dtype
    count: int  # elements (all_to_all: input rows; all_to_all_v: -1, see `check_splits`)
    op: str = ""
    root: int = -1
    row: int = 1  # elements per row (all-to-all)
    algorithm: str = ""
    device: str = "cpu"


# What must agree per collective, in the order disagreements are reported.
COMPARED: dict[str, tuple[str, ...]] = {
    "all_reduce": ("dtype", "count", "op", "device", "algorithm"),
    "broadcast": ("dtype", "count", "root", "device", "algorithm"),
    "all_gather": ("dtype", "count", "device", "algorithm"),
    "reduce_scatter": ("dtype", "count", "op", "device", "algorithm"),
    "all_to_all": ("dtype", "count", "row", "device", "algorithm"),
    "all_to_all_v": ("dtype", "row", "device", "algorithm"),
}
_COUNT_LABEL = {
    "all_gather": "input element count", "reduce_scatter": "output element count",
    "all_to_all": "input row count",
}
_LABELS = {"dtype": "dtype", "op": "reduce op", "root": "root", "row": "elements per row",
           "device": "device type", "algorithm": "algorithm"}


# ----- local checks (pure) -------------------------------------------------------------
def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def supported_devices(transports: Sequence[Any]) -> tuple[str, ...]:
    """Device types every transport of a communicator can move. When they share none (a
    configuration only some topologies can run), the union: the transports then refuse
    what they cannot move themselves."""
    sets = [tuple(getattr(t, "devices", None) or TRANSPORT_DEVICES.get(t.name, ("cpu", "cuda")))
            for t in transports]
    common = tuple(d for d in ("cpu", "cuda") if all(d in s for s in sets))
    return common or tuple(d for d in ("cpu", "cuda") if any(d in s for s in sets))


def tensor_problem(tensor: torch.Tensor, which: str, devices: Sequence[str]) -> str | None:
    """Why this tensor cannot take part in a collective here, or None.

    Non-contiguous tensors are refused rather than copied: collectives work in place on
    the caller's memory, and a hidden copy (plus copy-back) would cost the memory and time
    the caller did not ask for, as Gloo and NCCL also refuse them.
    """
    if tensor.dtype not in TORCH_DTYPES:
        return (f"unsupported dtype {dtype_name(tensor.dtype)} for the {which}; supported: "
                f"{', '.join(TORCH_DTYPES.values())}")
    device = tensor.device.type
    if device not in devices:
        return (f"the {which} is on device {device!r} but this communicator moves "
                f"{' and '.join(devices)} tensors")
    if not tensor.is_contiguous():
        return (f"the {which} is not contiguous; call .contiguous() first (topocoll works "
                "in place on the caller's memory)")
    return None


def pair_problem(inp: torch.Tensor, out: torch.Tensor) -> str | None:
    """Input and output of one call must share dtype and device (we move raw elements)."""
    if inp.dtype != out.dtype:
        return (f"input is {dtype_name(inp.dtype)} but output is {dtype_name(out.dtype)}; "
                "they must match")
    if inp.device != out.device:
        return f"input is on {inp.device} but output is on {out.device}; they must match"
    return None


def op_problem(op: object, dtype: torch.dtype) -> str | None:
    """An unknown op, or one the dtype cannot take (avg on integers would truncate)."""
    if not isinstance(op, str):
        return f"reduce op must be a string such as 'sum', got {op!r}"
    try:
        check_op(op, TORCH_DTYPES.get(dtype))
    except UnsupportedOpError as exc:
        return str(exc)
    return None


def rows_of(tensor: torch.Tensor) -> int:
    """Rows of dim 0 (split sizes count rows, as in torch); a 0-d tensor is one row."""
    return tensor.shape[0] if tensor.dim() else tensor.numel()


def row_elements(tensor: torch.Tensor) -> int:
    """Elements per row of dim 0."""
    count = 1
    for size in tensor.shape[1:]:
        count *= size
    return count


def parse_splits(which: str, rows: int, splits: Sequence[object] | None, world_size: int
                 ) -> tuple[list[int], str | None]:
    """Split sizes as ints, and why they cannot be used (or None).

    None means equal splits (rows must divide by the world size). Anything with
    `__index__` counts as an integer (numpy and 0-d tensor integers included); floats,
    bools and strings do not, since a silently rounded split sends the wrong rows.
    """
    if splits is None:
        if rows % world_size:
            return [], (f"{which} has {rows} rows, not divisible by {world_size} ranks; "
                        "pass split sizes")
        return [rows // world_size] * world_size, None
    values = list(splits)
    if len(values) != world_size:
        return [], (f"{which} split sizes have {len(values)} entries for {world_size} "
                    f"ranks: {values}")
    ints: list[int] = []
    for value in values:
        if isinstance(value, bool):
            return [], f"{which} split sizes must be integers, got {values}"
        try:
            ints.append(operator.index(value))
        except TypeError:
            return [], f"{which} split sizes must be integers, got {values}"
    if any(v < 0 for v in ints):
        return [], f"{which} split sizes must not be negative, got {ints}"
    if sum(ints) != rows:
        return [], f"{which} split sizes {ints} sum to {sum(ints)} but the {which} has {rows} rows"
    return ints, None


# ----- the wire format (pure) ----------------------------------------------------------
def encode(sig: Signature, problem: str | None) -> list[int]:
    """This rank's signature and refusal as `SIGNATURE_BYTES // 8` int64 values (JSON
    inside: readable, and nothing received is ever evaluated)."""
    record: dict[str, object] = {**sig._asdict(), "dtype": dtype_name(sig.dtype),
                                 "problem": problem}
    blob = json.dumps(record, sort_keys=True).encode()
    while len(blob) > SIGNATURE_BYTES:  # only long free text gets here: shorten it
        longest = max(("problem", "algorithm"), key=lambda k: len(str(record[k] or "")))
        text = str(record[longest])
        record[longest] = text[:len(text) // 2] + "..."
        blob = json.dumps(record, sort_keys=True).encode()
    return np.frombuffer(blob.ljust(SIGNATURE_BYTES, b"\0"), dtype="<i8").tolist()


def decode(values: Sequence[int]) -> dict[str, Any] | None:
    """A peer's signature record, or None when it is not one (a peer in another call)."""
    try:
        blob = np.asarray(values, dtype="<i8").tobytes().rstrip(b"\0")
        record = json.loads(blob.decode())
    except (ValueError, OverflowError):
        return None
    if not isinstance(record, dict) or set(record) != {*Signature._fields, "problem"}:
        return None
    return record


# ----- comparing (pure) ----------------------------------------------------------------
def rank_list(ranks: Sequence[int]) -> str:
    """'rank 2', 'ranks 0..2', 'ranks 0, 2, 4..6' (ranges are inclusive, as people read)."""
    ranks = sorted(ranks)
    parts: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else
                     f"{start}, {prev}" if prev == start + 1 else f"{start}..{prev}")
        if r is not None:
            start = prev = r
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


def _groups(values: Sequence[object]) -> list[tuple[object, list[int]]]:
    """Ranks grouped by value, in order of their first rank."""
    groups: dict[str, tuple[object, list[int]]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(repr(value), (value, []))[1].append(rank)
    return list(groups.values())


def _shown(value: object) -> str:
    return "none" if value in ("", None, -1) else str(value)


def _have(groups: list[tuple[object, list[int]]], verb: tuple[str, str] = ("has", "have")
          ) -> str:
    return ", ".join(f"{rank_list(ranks)} {verb[len(ranks) > 1]} {_shown(value)}"
                     for value, ranks in groups)


def disagreement(records: Sequence[Mapping[str, Any] | None]) -> str | None:
    """What is wrong with a call, given every rank's decoded signature (None: unreadable),
    or None when every rank may go ahead. The text names ranks and what differs."""
    unreadable = [r for r, rec in enumerate(records) if rec is None]
    if unreadable:
        return (f"{rank_list(unreadable)} sent no readable call signature (it is probably "
                "in a different collective call)")
    refusals = _groups([rec["problem"] for rec in records])
    problems = [f"{value} ({rank_list(ranks)})" for value, ranks in refusals if value]
    if problems:
        return "; ".join(problems)
    collectives = _groups([rec["collective"] for rec in records])
    if len(collectives) > 1:
        return f"ranks called different collectives: {_have(collectives, ('called', 'called'))}"
    collective = records[0]["collective"]
    found: list[str] = []
    for field in COMPARED.get(collective, ()):
        if field == "algorithm" and found:
            break  # a different size often means a different choice: report the cause
        groups = _groups([rec[field] for rec in records])
        if len(groups) > 1:
            label = _COUNT_LABEL.get(collective, "element count") if field == "count" \
                else _LABELS[field]
            found.append(f"ranks disagree on the {label}: {_have(groups)}")
    return "; ".join(found) or None


def split_disagreement(send_rows: Sequence[Sequence[int]], recv_rows: Sequence[Sequence[int]],
                       shown: int = 3) -> str | None:
    """All-to-all-v per-peer consistency: `send_rows[i][j]` (rows rank i sends to j) must
    equal `recv_rows[j][i]` (rows j expects from i). None when they all do."""
    p = len(send_rows)
    bad = [(i, j) for i in range(p) for j in range(p) if send_rows[i][j] != recv_rows[j][i]]
    if not bad:
        return None
    text = "; ".join(f"rank {i} sends {send_rows[i][j]} row(s) to rank {j}, which expects "
                     f"{recv_rows[j][i]}" for i, j in bad[:shown])
    more = f" (and {len(bad) - shown} more pair(s))" if len(bad) > shown else ""
    return f"split sizes do not match between ranks: {text}{more}"


# ----- the cross-rank check ------------------------------------------------------------
GatherInts = Callable[[list[int], str], list[list[int]]]
"""Every rank's list of int64 values (all of one length), in rank order; bounded by the
communicator's timeout. The communicator gives its own small all-gather."""


class Agreement:
    """The cross-rank part of validation, with its cache (one per communicator).

    Every rank makes the same calls in the same order, so every rank's cache holds the
    same signatures and all ranks decide alike whether a call is checked: only a rank
    whose call differs decides otherwise, which is the case the check exists to catch
    (see the module docstring for what that costs when it happens after the first call).
    """

    def __init__(self, rank: int, gather: GatherInts, debug: bool = False,
                 capacity: int = CHECK_CACHE_SIZE) -> None:
        self.rank = rank
        self.gather = gather
        self.debug = debug
        self.capacity = capacity
        self.exchanges = 0  # how many cross-rank checks ran (tests hold the fast path to it)
        self._seen: OrderedDict[Signature, None] = OrderedDict()

    def error(self, collective: str, problem: str, cls: type[CollectiveError] = CollectiveError
              ) -> CollectiveError:
        return cls(f"rank {self.rank}: {collective}: {problem}")

    def due(self, sig: Signature) -> bool:
        """Whether this call is checked across ranks (first of its signature, or debug)."""
        if self.debug or sig not in self._seen:
            return True
        self._seen.move_to_end(sig)
        return False

    def remember(self, sig: Signature) -> None:
        """Record a signature every rank agreed on (call once the whole check passed)."""
        self._seen[sig] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def check(self, sig: Signature, problem: str | None) -> bool:
        """Refuse the call on every rank if any rank refuses it or ranks disagree.

        Returns whether the cross-rank check ran (the caller then `remember`s the
        signature once any further check of its own has passed too).
        """
        if not self.due(sig):
            if problem is not None:
                raise self.error(sig.collective, problem)
            return False
        self.exchanges += 1
        what = f"{sig.collective} input check"
        try:
            rows = self.gather(encode(sig, problem), what)
        except Exception as exc:
            if problem is None:
                raise
            raise self.error(sig.collective, f"{problem} (the other ranks did not take part "
                                             f"in the input check: {exc})") from exc
        records = [decode(row) for row in rows]
        wrong = disagreement(records)
        if wrong is not None:
            refused = any(rec is not None and rec["problem"] for rec in records)
            raise self.error(sig.collective, wrong,
                             CollectiveError if refused else MismatchError)
        return True

    def check_splits(self, collective: str, send: list[int], recv: list[int]
                     ) -> tuple[list[list[int]], list[list[int]]]:
        """Gather every rank's (send, receive) split sizes, refuse on every rank if some
        pair disagrees; returns the send and receive matrices."""
        p = len(send)
        rows = self.gather([*send, *recv], f"{collective} split-size check")
        send_rows, recv_rows = [r[:p] for r in rows], [r[p:] for r in rows]
        wrong = split_disagreement(send_rows, recv_rows)
        if wrong is not None:
            raise self.error(collective, wrong, MismatchError)
        return send_rows, recv_rows
