"""Tensor-parallel process groups over ``torch.distributed``: the launcher's environment, one
collective backend per device kind, rank -> device, and the few collectives the model calls.

A tensor-parallel run is N processes started by ``torchrun --nproc-per-node N`` (or any launcher
that sets the same variables): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. Every rank loads its slice of the weights (``model/sharding.py``) and runs the
same forward passes in lockstep; the collectives between them are

    all_reduce   after each row-parallel linear (o_proj, down_proj) and the vocab-parallel embedding
    all_gather   of the vocab-parallel logits (every rank gets all V columns, float32), of the heads
                 before a norm over all heads (SALA's lightning o_norm), and of the query heads of a
                 KV group split across ranks (InfLLM-v2 selection when KV heads are replicated)

Backends: ``gloo`` on ``cpu`` (and on the emulated NPU, whose tensors live on the CPU), ``nccl``
on ``cuda``, ``hccl`` on ``npu`` (torch_npu registers it). Rank r uses device ``<kind>:LOCAL_RANK``.

Nothing hangs: the group has a timeout (``HAL_TP_TIMEOUT`` seconds, default 300) that bounds every
collective; a rank that exits breaks its peers' next collective at once (gloo: "connection closed
by peer"), which becomes a :class:`~hal.errors.DistributedError`; :meth:`TPGroup.agree` lets every
rank learn, after loading, that one of them failed and why, so all exit with the same code and
rank 0 prints the one line (the others are quiet: ``hal/cli.py``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from hal import env
from hal.errors import DeviceUnavailable, DistributedError, HalError, InputError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
"""Device kind -> torch.distributed backend."""
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MESSAGE_BYTES = 255
"""Room for one rank's error line in :meth:`TPGroup.agree` (UTF-8, cut at this length; its length is one byte)."""

_OWNED = False  # True when setup() initialised the default group (shutdown() destroys it then)


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process (``torchrun`` sets all five variables)."""

    rank: int
    world_size: int
    local_rank: int


def launch() -> Launch | None:
    """This process's place in a launched job, or None when no launcher set ``WORLD_SIZE``.
    Raises InputError naming the variable when one is malformed or missing."""
    if "WORLD_SIZE" not in os.environ:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ.get(name, "0" if name == "LOCAL_RANK" else None)
        try:
            values[name] = int(raw)
        except (TypeError, ValueError):
            raise InputError(f"{name}={raw!r}: expected an integer (set by torchrun)") from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"] or values["LOCAL_RANK"] < 0:
        raise InputError(f"RANK={values['RANK']}, WORLD_SIZE={values['WORLD_SIZE']}, "
                         f"LOCAL_RANK={values['LOCAL_RANK']}: expected 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0")
    return Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])


def is_quiet_rank() -> bool:
    """True in a launched process of rank > 0: only rank 0 prints errors and reports."""
    try:
        return int(os.environ.get("RANK", "0") or 0) != 0 and "WORLD_SIZE" in os.environ
    except ValueError:
        return False


def check_world(tp: int) -> Launch | None:
    """Refuse a tensor-parallel size the launcher did not start (one line, the same on every rank)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise InputError(f"tp must be an integer >= 1, got {tp!r}")
    started = launch()
    world = started.world_size if started else 1
    if world != tp:
        how = f"WORLD_SIZE={world}" if started else "WORLD_SIZE unset: no launcher"
        raise InputError(f"tp={tp} needs {tp} processes, but this job has {world} ({how}): run "
                         f"torchrun --nproc-per-node {tp} ... --tp {tp}")
    return started


def backend_for(kind: str) -> str:
    """The collective backend of a device kind (the emulated NPU's tensors are CPU tensors: gloo)."""
    if kind == "npu" and env.npu_emulate():
        return "gloo"
    return BACKENDS[kind]


def rank_device(kind: str, local_rank: int) -> torch.device:
    """Device of the rank with ``local_rank`` on its node; DeviceUnavailable when too few are visible."""
    if kind == "cpu" or (kind == "npu" and env.npu_emulate()):
        return torch.device("cpu")
    module = torch.cuda if kind == "cuda" else getattr(torch, "npu", None)
    count = module.device_count() if module is not None else 0
    if local_rank >= count:
        raise DeviceUnavailable(f"rank with LOCAL_RANK={local_rank} needs {kind}:{local_rank}, but only {count} "
                                f"{kind} device(s) are visible")
    module.set_device(local_rank)
    return torch.device(kind, local_rank)


class TPGroup:
    """The tensor-parallel context: ``rank`` of ``size`` ranks in ``group`` (None: the default
    group) on ``device``. ``size == 1`` is a single process: every collective is the identity."""

    def __init__(self, rank: int, size: int, device: torch.device, backend: str | None = None,
                 group: Any = None, timeout_s: float | None = None):
        self.rank = rank
        self.size = size
        self.device = device
        self.backend = backend
        self.group = group
        self.timeout_s = timeout_s

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "TPGroup":
        return cls(0, 1, torch.device(device))

    def describe(self) -> str:
        return "tp=1" if self.size == 1 else f"tp={self.size} ({self.backend}, rank {self.rank})"

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args, group=self.group)
        except RuntimeError as exc:  # gloo / nccl errors: a peer vanished or the timeout ran out
            from hal.cli import first_line

            raise DistributedError(f"rank {self.rank}: {what} across {self.size} ranks failed (a peer exited "
                                   f"or did not answer within {self.timeout_s:g} s): {first_line(exc)}"[:400]) \
                from None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks, in place (returned for chaining)."""
        if self.size > 1:
            import torch.distributed as dist

            self._call("all_reduce", dist.all_reduce, tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' ``tensor`` (same shape on every rank) concatenated along ``dim`` in rank order."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._call("all_gather", dist.all_gather, parts, tensor)
        return torch.cat(parts, dim=dim)

    def shared_seed(self) -> int:
        """A fresh random seed, rank 0's, on every rank (sampling must agree across ranks)."""
        seed = torch.tensor([torch.seed() % (2 ** 62)], dtype=torch.int64, device=self.device)
        if self.size > 1:
            import torch.distributed as dist

            self._call("broadcast", dist.broadcast, seed, 0)
        return int(seed.item())

    def agree(self, error: BaseException | None) -> None:
        """After a step every rank runs (loading): return when every rank succeeded, else raise on
        every rank. A failed rank re-raises its own error; the others raise the first failed
        rank's line as :class:`DistributedError` (its error was a HalError: exit 2) or as
        :class:`RankFailed` (an internal error: exit 3)."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        code = 0 if error is None else (2 if isinstance(error, HalError) else 3)
        line = b""
        if error is not None:
            from hal.cli import first_line

            line = f"rank {self.rank}: {first_line(error)}".encode("utf-8")[:MESSAGE_BYTES]
        mine = torch.zeros(2 + MESSAGE_BYTES, dtype=torch.uint8)
        mine[0], mine[1] = code, len(line)
        if line:
            mine[2:2 + len(line)] = torch.tensor(list(line), dtype=torch.uint8)
        everyone = self.all_gather(mine.to(self.device)[None], dim=0).cpu()
        failed = [r for r in range(self.size) if int(everyone[r, 0]) != 0]
        if not failed:
            return
        if error is not None:
            raise error
        first = everyone[failed[0]]
        message = bytes(first[2:2 + int(first[1])].tolist()).decode("utf-8", errors="replace")
        if int(first[0]) == 2:
            raise DistributedError(message)
        raise RankFailed(message)


class RankFailed(RuntimeError):
    """Another rank hit an internal error (not a HalError): every rank exits 3, like that one."""


def timeout_s() -> float:
    return env.tp_timeout()


def setup(kind: str, tp: int) -> TPGroup:
    """The :class:`TPGroup` for ``tp`` ranks on device kind ``kind``, initialising the default
    process group from the launcher's environment unless the caller already did.

    Raises InputError (tp != WORLD_SIZE, no launcher, malformed variables), DeviceUnavailable
    (too few devices for LOCAL_RANK) or DistributedError (the rendezvous failed or timed out)."""
    global _OWNED
    started = check_world(tp)
    if tp == 1:
        from hal.probing import torch_device

        return TPGroup.single(torch_device(kind))
    import torch.distributed as dist

    backend = backend_for(kind)
    device = rank_device(kind, started.local_rank)
    limit = timeout_s()
    if dist.is_initialized():
        if dist.get_world_size() != tp:
            raise InputError(f"tp={tp}, but the initialised process group has {dist.get_world_size()} ranks")
        return TPGroup(dist.get_rank(), tp, device, dist.get_backend(), None, limit)
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(f"tp={tp}: launcher variable {missing[0]} is not set (run under torchrun)")
    try:
        dist.init_process_group(backend, rank=started.rank, world_size=tp,
                                timeout=datetime.timedelta(seconds=limit))
    except (RuntimeError, ValueError) as exc:
        from hal.cli import first_line

        raise DistributedError(f"rank {started.rank}: cannot form the {backend} process group of {tp} ranks "
                               f"({os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): {first_line(exc)}"[:400]) \
            from None
    _OWNED = True
    return TPGroup(started.rank, tp, device, backend, None, limit)


def shutdown() -> None:
    """Destroy the default process group if :func:`setup` created it (end of a CLI)."""
    global _OWNED
    if not _OWNED:
        return
    import torch.distributed as dist

    _OWNED = False
    if dist.is_initialized():
        dist.destroy_process_group()
