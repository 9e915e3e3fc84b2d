"""Several processes, one sparse network: what regrow needs from ``torch.distributed``.

Under data parallelism (DDP) every rank holds a copy of the model and sees its own slice of each batch. DDP keeps
the weights equal by averaging the parameters' gradients; a sparsifier must keep the *masks* equal too, or the
ranks train different networks. Every mask decision therefore comes from tensors that are the same on every rank:

- weights (equal under DDP) and the sparsifier's own generator (the same seed on every rank: SET's random growth,
  random start masks);
- gradients that DDP does not reduce — the dense gradient dL/d(W ⊙ M) that RigL grows by and gradient criteria
  accumulate — are averaged over the ranks here (:func:`average`) before they are used, so they are the gradient
  of the global batch, as DDP's own are.

After every mask update the sparsifier compares a checksum of its masks across ranks (:func:`check_same_masks`):
a mismatch is a :class:`regrow.errors.DistributedError`, not a warning. Nothing here does anything in a single
process (no process group, or a group of one).
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .errors import DistributedError, RegrowError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """True in a process group of two or more ranks."""
    return world()[1] > 1


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the GPU for NCCL, the CPU for Gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` averaged over the ranks (a new tensor; the tensor itself in a single process)."""
    if not active():
        return tensor
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(world()[1]).to(tensor.device)


def mask_checksum(mask: torch.Tensor) -> torch.Tensor:
    """Three int64 numbers that differ between two masks of the same shape unless (almost surely) they are equal:
    the kept count, and two position-weighted sums of the kept entries (mod a large prime, no overflow)."""
    flat = mask.detach().reshape(-1).bool().cpu()
    idx = torch.nonzero(flat).reshape(-1).to(torch.int64)
    prime = 2_147_483_647
    weighted = ((idx * 2_654_435_761) % prime).sum() % prime
    squared = ((idx % 1_000_003) * (idx % 999_983) % prime).sum() % prime
    return torch.stack([idx.new_tensor(idx.numel()), weighted, squared])


def check_same_masks(masks: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`DistributedError` on every rank if any rank's masks differ from the others'."""
    if not active():
        return
    names = sorted(masks)
    local = torch.stack([mask_checksum(masks[n]) for n in names]) if names else torch.zeros(0, 3, dtype=torch.int64)
    local = local.to(_comm_device())
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [n for n, lo, hi in zip(names, low, high) if not torch.equal(lo, hi)]
    if differ:
        raise DistributedError(
            f"the masks of {len(differ)} layer(s) ({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}) "
            f"differ between ranks after the mask update at step {step}: every rank must build its sparsifier with "
            "the same options and seed, and a method's scores must come from tensors equal on every rank")


def local_device(device: torch.device) -> torch.device:
    """A bare ``cuda`` under data parallelism is this process's own GPU (``LOCAL_RANK``, as torchrun sets it)."""
    if device.type == "cuda" and device.index is None and active():
        local = int(os.environ.get("LOCAL_RANK", world()[0] % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def backend_for(device: str) -> str:
    """NCCL for GPUs, Gloo for the CPU."""
    return "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"


def init_from_environment(device: str) -> bool:
    """Join the process group a launcher such as ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment);
    False when there is none to join."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend_for(device))
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, nproc: int, port: int, backend: str, threads: int, fn: Callable, args: tuple,
            errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=nproc)
    try:
        fn(*args)
        dist.barrier()  # no rank tears the group down while another still uses it
    except RegrowError as e:  # shown by the parent in one line; raising ends the other ranks too
        errors.put((rank, type(e).__name__, str(e)))
        raise
    except BaseException:
        errors.put((rank, "crash", traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), device: str = "cpu",
           threads: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` processes that form one process group on this machine (Gloo on the CPU,
    NCCL on GPUs, one GPU per process). CPU threads are split between the processes unless ``threads`` is given.
    A :class:`regrow.errors.RegrowError` in any process is raised here (as a :class:`DistributedError` naming
    the rank), after every process has ended."""
    import torch.multiprocessing as mp

    if not isinstance(nproc, int) or nproc < 1:
        raise DistributedError(f"the number of processes must be a positive integer, got {nproc!r}")
    backend = backend_for(device)
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise DistributedError(f"{nproc} processes need {nproc} GPUs; this machine has {torch.cuda.device_count()}")
    threads = threads or max(1, torch.get_num_threads() // nproc)
    # torch logs "Terminating process ... via signal SIGTERM" when it ends the other ranks after a failure: the
    # failure itself is what this function raises.
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(nproc, _free_port(), backend, threads, fn, args, errors), nprocs=nproc,
                           start_method="spawn")
    except mp.ProcessRaisedException:
        pass  # reported through the queue below
    except mp.ProcessExitedException as e:
        raise DistributedError(f"process {e.error_index} of {nproc} died (exit code {e.exit_code})") from None
    finally:
        spawn_log.setLevel(level)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    if reported:
        rank, kind, message = min(reported, key=lambda r: r[1] == "crash")  # a refusal explains more than a crash
        if kind == "crash":
            raise DistributedError(f"process {rank} of {nproc} failed:\n{message}")
        raise DistributedError(f"process {rank} of {nproc}: {message}")
