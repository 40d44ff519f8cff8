"""Start and stop ``torch.distributed`` the way torchrun expects (env:// rendezvous)."""
from __future__ import annotations

import datetime
import os
import warnings

import torch
import torch.distributed as dist

from .groups import collective_timeout_s, set_collective_timeout_s

__all__ = ["init_distributed", "default_backend", "local_device", "destroy", "free_port", "descendants"]


def default_backend() -> str:
    """NCCL when CUDA GPUs are present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` with GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns (rank, world).

    ``timeout_s``: every collective's timeout, of the world and of the groups
    ``init_parallel_groups`` makes later (default: ``longseq.groups.collective_timeout_s()``, 600 s
    unless ``$LONGSEQ_COLLECTIVE_TIMEOUT_S`` says otherwise). A rank that stops answering makes the
    others raise ``longseq.comm.CollectiveError`` after it.

    Without torchrun's variables, starts a single-process group (world 1) on 127.0.0.1 so scripts
    also run as plain ``python``. After a torchrun restart (``--max-restarts``) of a single-node
    job it joins through a per-attempt store namespace (see ``_restart_store``).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    timeout_s = float(timeout_s) if timeout_s is not None else collective_timeout_s()
    set_collective_timeout_s(timeout_s)
    backend = backend or default_backend()
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _restart_store(timeout)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _restart_store(timeout: datetime.timedelta):
    """A fresh store namespace for a worker group that torchrun restarted, or None.

    Since PyTorch 2.5 torchrun's workers share the agent's TCPStore across restarts, so a restarted
    worker group can read the previous attempt's addresses and fail to connect (PyTorch issue
    135712; torchrun's own switch is ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``). On a restart of a
    single-node job the process group gets a key prefix of its own per attempt. The restart count is
    consistent within one agent, not across nodes, so multi-node jobs only get a warning.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    shared = (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
              and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1")
    if restart == 0 or not shared:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        if os.environ.get("RANK") == "0":
            warnings.warn("a torchrun restart with the shared rendezvous store may fail to connect (PyTorch "
                          "issue 135712); launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"longseq/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt{restart}", store)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for single-machine rendezvous: tests, benchmarks)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, theirs, ...), from /proc (Linux); [] elsewhere. Used to
    SIGKILL a launched job whole: torchrun starts its workers in sessions of their own."""
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return [d for k in kids for d in [k] + descendants(k)]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
