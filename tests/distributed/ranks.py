"""Run a function on N CPU ranks (gloo) in fresh processes and collect what each returns.

    results = run_ranks(fn, world=2, args=(...))   # fn(rank, world, *args) -> picklable; [result per rank]

fn must be importable by name (a module-level function of a test module). The process group comes
from a file in a temporary folder (no port to collide with); each rank uses one thread, so two
ranks share this machine's two cores. An exception on any rank fails the call with that rank's
traceback; a rank that hangs (a collective the other never reaches) is killed after `timeout`.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

ProcessException = importlib.import_module("torch.multiprocessing.spawn").ProcessException


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 600.0) -> list:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="spt-inductor-"))
    with tempfile.TemporaryDirectory(prefix="spt-ranks-") as tmp:
        init_file, out_dir = str(Path(tmp) / "init"), str(Path(tmp) / "out")
        os.makedirs(out_dir)
        ctx = mp.start_processes(_entry, args=(world, init_file, out_dir, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=5) and time.monotonic() < deadline:
                pass
        except ProcessException:
            pass  # the failing rank's own traceback is in its result file
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                raise AssertionError(f"rank {rank} left no result (killed, or hung past {timeout} s)")
            got = torch.load(path, weights_only=False)
            if "error" in got:
                raise AssertionError(f"rank {rank} failed:\n{got['error']}")
            results.append(got["ok"])
        return results
