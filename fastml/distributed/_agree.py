"""Checking a call's arguments across a process group before any data moves.

A collective started by some ranks and not others waits until the group's timeout (30 minutes by default), so a
bad argument on one rank must become an error on every rank. Each rank first validates its own arguments and
catches what that raises; then one all_gather of a small fixed-size record per rank (its shapes, dtype, options
and, if it failed, the error's kind and message) lets every rank take the same decision from the same data: either
all ranks go on, or all raise.
"""
import struct

import torch
import torch.distributed as dist

from fastml._backend import BackendUnavailable

_MSG_BYTES = 512
_ERROR_KINDS = {0: None, 1: ValueError, 2: TypeError, 3: BackendUnavailable, 4: RuntimeError}


def _kind_of(exc):
    for code, cls in _ERROR_KINDS.items():
        if cls is not None and type(exc) is cls:
            return code
    if isinstance(exc, BackendUnavailable):
        return 3
    if isinstance(exc, TypeError):
        return 2
    if isinstance(exc, ValueError):
        return 1
    return 4


def float_bits(x):
    """A Python float as an int64 with the same bits, so that ranks compare floats exactly."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_float(b):
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def exchange_records(fields, error, group, device):
    """All-gather one record per rank. `fields` is a list of ints (the same length on every rank); `error` is the
    exception this rank's local validation raised, or None.

    Returns the started collective: call `finish()` on it to get the list of every rank's fields, after raising on
    every rank if any rank reported an error (its own exception on the rank that failed, the same kind of exception
    naming that rank elsewhere). Between the two, the caller may do local work that needs no other rank.
    """
    n = len(fields)
    header = [_kind_of(error) if error is not None else 0] + [int(f) for f in fields]
    msg = b"" if error is None else str(error).encode("utf-8", "replace")[:_MSG_BYTES]
    record = torch.cat([torch.tensor(header, dtype=torch.int64).view(torch.uint8),
                        torch.tensor(list(msg) + [0] * (_MSG_BYTES - len(msg)), dtype=torch.uint8)])
    world = dist.get_world_size(group)
    record = record.to(device)
    out = record.new_empty(world * record.numel())
    work = dist.all_gather_single(out, record, group=group, async_op=True)
    return _Pending(work, out, world, n, error, dist.get_rank(group))


class _Pending:
    def __init__(self, work, out, world, n, error, rank):
        self.work, self.out, self.world, self.n, self.error, self.rank = work, out, world, n, error, rank

    def finish(self):
        self.work.wait()
        rows = self.out.cpu().view(self.world, -1)  # the one host read of the call: the decision is taken on it
        width = 8 * (self.n + 1)
        records = []
        for r in range(self.world):
            header = rows[r, :width].clone().view(torch.int64).tolist()
            records.append((header[0], header[1:], bytes(rows[r, width:].tolist()).rstrip(b"\0")))
        if self.error is not None:
            raise self.error
        for r, (kind, _, msg) in enumerate(records):
            if kind:
                cls = _ERROR_KINDS.get(kind, RuntimeError)
                raise cls(f"rank {r} of the group rejected its arguments, so every rank stops here: "
                          f"{msg.decode('utf-8', 'replace')}")
        return [fields for _, fields, _ in records]
