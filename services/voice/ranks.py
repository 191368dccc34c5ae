"""The voice's tensor-parallel ranks as processes: rank 0 starts the followers, watches them, takes them along.

supervisord runs one `voice` program, rank 0. It starts ranks 1..n-1 as its own children
(`python -m services.voice.rank`), one per GPU, and:
- a follower that exits for any reason makes rank 0 exit at once (supervisord restarts it, and it starts
  a fresh set), so the coordinator sees the voice worker die, exactly as with one process;
- rank 0's death kills the followers (the kernel's parent-death signal), and supervisord's stop signal to
  the process group is ignored by them: they stop when rank 0 has drained and exited.
So `supervisorctl restart voice` restarts every rank, and the coordinator only ever sees one `voice`.

Followers publish their measured memory in the rendezvous store; rank 0 reports it with its own.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

from shared.config.schema import ConfigError, ModelEntry, load_config
from shared.models.base import BackendError
from shared.runtime.process import RANK_GPU_ENV
from shared.wire.messages import MemoryReading
from shared.wire.names import VOICE

log = logging.getLogger(__name__)

STORE_TIMEOUT = timedelta(minutes=10)  # followers must load and join within this
FOLLOWER_EXIT_CODE = 3
PR_SET_PDEATHSIG = 1
GPUS_VARIABLE = "LYRA_VOICE_GPUS"
_started = threading.Event()


def world_size(entry: ModelEntry, physical_gpus: list[int]) -> int:
    """Ranks of a tensor-parallel voice: `ranks`, else one per GPU of the service (1 = not parallel)."""
    if entry.parallel != "tensor":
        return 1
    if physical_gpus and entry.ranks and entry.ranks != len(physical_gpus):
        raise BackendError(f"model {entry.name!r}: ranks = {entry.ranks} but the voice has GPUs {physical_gpus}; "
                           "one rank per GPU (set ranks = 0 or give it as many GPUs)")
    return entry.ranks or len(physical_gpus)


def pin_rank0_to_its_gpu(argv: list[str]) -> None:
    """Before torch starts: rank 0 of a tensor voice uses only its own GPU (the first), so it makes no CUDA
    context on the followers' GPUs (the plan counts one context per rank); the voice's whole GPU list moves
    to GPUS_VARIABLE. It still sees them all (see `rank_environment`). Started by hand, without
    CUDA_VISIBLE_DEVICES, the config's GPUs for the voice decide (as under supervisord).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and "," not in visible:
        return  # one GPU or none: nothing to pin
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", "-c", default=os.environ.get("LYRA_CONFIG", ""))
    try:
        config = load_config(parser.parse_known_args(argv)[0].config)
    except (ConfigError, OSError):
        return  # the worker's own start reports a bad config
    if config.voice.parallel != "tensor":
        return
    if visible is None:
        gpus = config.gpus_of(VOICE)
    else:
        gpus = [int(gpu) for gpu in visible.split(",") if gpu.strip().isdigit()]
    if len(gpus) > 1:
        os.environ.update(rank_environment(gpus, 0))
        os.environ[GPUS_VARIABLE] = ",".join(str(gpu) for gpu in gpus)


def rank_environment(gpus: list[int], rank: int) -> dict[str, str]:
    """What a rank's process needs to see: every GPU of the voice, its own first (cuda:0), used alone.

    The peer all-reduce maps each rank's buffer into the others' address space; CUDA maps memory of a GPU
    only into a process that sees that GPU. `RANK_GPU_ENV` keeps the rank to its own GPU (memory caps,
    `physical_gpus`), and since every rank's own GPU is its device 0, PyTorch's symmetric memory is told
    that equal device numbers on different ranks are different GPUs.
    """
    own_first = gpus[rank:] + gpus[:rank]
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in own_first), RANK_GPU_ENV: str(gpus[rank]),
            "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1"}


def voice_gpus(visible: list[int]) -> list[int]:
    """The voice's physical GPUs: all of them for a rank 0 pinned to its own, else what this process sees."""
    pinned = os.environ.get(GPUS_VARIABLE, "")
    return [int(gpu) for gpu in pinned.split(",") if gpu.strip().isdigit()] if pinned else visible


def started() -> bool:
    """Whether this process is a rank 0 that started followers (it must then exit without atexit teardown)."""
    return _started.is_set()


def rank_device(physical_gpus: list[int]) -> Any:
    """A rank's device: its own GPU, the first it sees; else the CPU."""
    import torch

    return torch.device("cuda", 0) if physical_gpus and torch.cuda.is_available() else torch.device("cpu")


class Followers:
    """Ranks 1..n-1, as children of rank 0."""

    def __init__(self, config_path: str, physical_gpus: list[int], world: int) -> None:
        self.config_path = config_path
        self.physical_gpus = physical_gpus
        self.world = world
        self.processes: list[subprocess.Popen[bytes]] = []
        self.store: Any = None

    def start(self) -> Any:
        """Open the rendezvous store, start the followers and a watcher for each; returns the store."""
        from torch.distributed import TCPStore

        self.store = TCPStore("127.0.0.1", 0, self.world, is_master=True, timeout=STORE_TIMEOUT,
                              wait_for_workers=False)
        for rank in range(1, self.world):
            self.processes.append(self._spawn(rank, self.store.port))
        for rank, process in enumerate(self.processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), name=f"rank{rank}-watch", daemon=True).start()
        _started.set()
        return self.store

    def _spawn(self, rank: int, port: int) -> subprocess.Popen[bytes]:
        env = {name: value for name, value in os.environ.items() if name != GPUS_VARIABLE}
        if self.physical_gpus:
            env.update(rank_environment(self.physical_gpus, rank))
        command = [sys.executable, "-m", "services.voice.rank", "--config", self.config_path, "--rank", str(rank),
                   "--world", str(self.world), "--store", f"127.0.0.1:{port}"]
        process = subprocess.Popen(command, env=env)  # stdout/stderr: rank 0's, so the voice log has every rank
        log.info("started tensor rank %d of %d (pid %d, %s)", rank, self.world, process.pid,
                 f"GPU {self.physical_gpus[rank]}" if self.physical_gpus else "CPU")
        return process

    def _watch(self, rank: int, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        log.critical("tensor rank %d (pid %d) exited with %s: the voice exits so that supervisord restarts "
                     "every rank together", rank, process.pid, code)
        logging.shutdown()
        os._exit(FOLLOWER_EXIT_CODE)

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def readings(self) -> list[MemoryReading]:
        """What each follower last published (nothing yet for one still loading)."""
        found = []
        for rank in range(1, self.world):
            key = memory_key(rank)
            if self.store is not None and self.store.check([key]):
                found.extend(MemoryReading.model_validate(item) for item in json.loads(self.store.get(key)))
        return found


def memory_key(rank: int) -> str:
    return f"lyra/memory/rank{rank}"


def merged(readings: list[MemoryReading]) -> list[MemoryReading]:
    """One reading per device: the CPU ranks' resident sets add up (GPU ranks each have their own GPU)."""
    by_device: dict[str, MemoryReading] = {}
    for reading in readings:
        seen = by_device.get(reading.device)
        if seen is None:
            by_device[reading.device] = reading
            continue
        nvml = None if seen.nvml_used_bytes is None or reading.nvml_used_bytes is None else \
            seen.nvml_used_bytes + reading.nvml_used_bytes
        by_device[reading.device] = MemoryReading(
            device=reading.device, allocated_bytes=seen.allocated_bytes + reading.allocated_bytes,
            reserved_bytes=seen.reserved_bytes + reading.reserved_bytes, nvml_used_bytes=nvml)
    return list(by_device.values())


# ----------------------------------------------------------------------------- the follower's side


def die_with_parent() -> None:
    """Get SIGKILL when rank 0 dies; ignore supervisord's SIGTERM (rank 0 drains first, then exits)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank may outlive rank 0", ctypes.get_errno())
    if os.getppid() == 1:  # rank 0 died before the signal was armed
        os._exit(FOLLOWER_EXIT_CODE)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def publish_memory(store_address: str, rank: int, measure: Any, interval_s: float) -> None:
    """Publish this rank's readings every `interval_s` from a thread, on a store connection of its own."""
    from torch.distributed import TCPStore

    host, port = store_address.rsplit(":", 1)
    store = TCPStore(host, int(port), is_master=False, timeout=STORE_TIMEOUT)

    def loop() -> None:
        while True:
            store.set(memory_key(rank), json.dumps([r.model_dump() for r in measure()]))
            time.sleep(interval_s)

    threading.Thread(target=loop, name="memory", daemon=True).start()
