"""Run a test body in spawned gloo processes, one per rank, and fail the test with the ranks' own errors."""

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, body, args, store, errfile, port):
    try:
        if port is None:
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        else:  # what torchrun sets: the body joins the group itself
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(world),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
            )
        torch.set_num_threads(1)
        body(rank, *args)
        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()
    except BaseException as e:  # surface the child's failure in the parent
        with open(errfile, "a") as f:
            f.write(f"rank {rank}: {type(e).__name__}: {e}\n")
        raise
    # Every check passed and the group is destroyed. Leave without the interpreter's teardown: gloo threads that
    # outlive it (torch's DistributedDataParallel keeps its group alive after destroy_process_group) sometimes
    # abort a finished rank with SIGABRT ("terminate called without an active exception"), seen in CI.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(body, *args, world: int = WORLD, torchrun_env: bool = False) -> None:
    """``body(rank, *args)`` in ``world`` spawned processes.

    By default each process joins a gloo group over a file store first (no TCP port to race for); with
    ``torchrun_env`` it gets torchrun's environment variables instead and ``body`` joins the group itself. ``body``
    must be a module-level function (it is pickled). A failing rank fails the test with every rank's message (the
    others may fail in turn, e.g. a collective's connection reset by the rank that died) and the exit status of the
    first rank that stopped.
    """
    with tempfile.TemporaryDirectory() as d:
        store, errfile = str(Path(d) / "store"), str(Path(d) / "err")
        port = _free_port() if torchrun_env else None
        try:
            mp.spawn(_rank_main, args=(world, body, args, store, errfile, port), nprocs=world, join=True)
        except Exception as e:  # the ranks' own errors, then how the first rank to stop ended
            raised = Path(errfile).read_text() if os.path.exists(errfile) else "no rank raised\n"
            pytest.fail(f"{raised}{type(e).__name__}: {e}")
