"""Multi-process CPU tests: spawn N ranks that meet in a gloo group through a file store (no TCP port
to pick and race for), with a deadline, and a stack dump from any rank that gets stuck."""

from __future__ import annotations

import faulthandler
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 240  # a run takes 5-15 s; generous for a loaded 2-core machine
STACK_DUMP_S = 200  # a stuck rank prints where it is (in the test's output) before the deadline


def _rank_main(rank: int, world: int, store_dir: str, fn, args) -> None:
    faulthandler.dump_traceback_later(STACK_DUMP_S, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, args: tuple, nprocs: int, store_dir) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes inside one gloo group; fail the test on a
    rank's error (raised) or past the deadline. ``fn`` must be importable (a module-level function)."""
    ctx = mp.start_processes(_rank_main, args=(nprocs, str(store_dir), fn, args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs}-rank run did not finish in {DEADLINE_S} s")
