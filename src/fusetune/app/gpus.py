"""One GPU per worker process of the joblib launcher (conf/hydra/launcher/local.yaml), through CUDA_VISIBLE_DEVICES.

Joblib runs the jobs of a sweep in loky worker processes. Each is a fresh interpreter (fork + exec), and a worker
is reused for later jobs. CUDA reads CUDA_VISIBLE_DEVICES once, when the process first touches it, so a worker
keeps one GPU for its whole life, and it must set the variable before its first job arrives. Unpickling a job
imports fusetune, hence PEFT and bitsandbytes, and importing bitsandbytes initialises CUDA on a GPU host (it reads
every device's compute capability). A Hydra callback (``on_job_start``) runs after that, too late.

So local.yaml gives joblib an ``initializer``, which it passes on to loky: ``OneGPUPerWorker``, called in each new
worker before the worker takes a job. It claims the lowest free slot N (an flock on
``SWEEP_DIR/.gpu_slots/N.lock``, held until the process exits) and sets CUDA_VISIBLE_DEVICES to GPU N mod G of the
G GPUs the sweep sees. Two live workers never share a slot, whatever jobs they pick up, in whatever order. With
more workers than GPUs they share the GPUs evenly, and a worker that loky replaces (idle for 300 s, or crashed)
frees its slot for the next one. With fewer than two GPUs it does nothing, and with n_jobs=1 joblib runs the jobs
in the sweep's own process, without workers.

The worker must not import fusetune before the initializer has run, so this module's functions travel to it by
value (cloudpickle's register_pickle_by_value; loky pickles with cloudpickle): what runs there,
``OneGPUPerWorker``, ``use_one_gpu`` and ``claim_slot``, uses only the standard library. (A Hydra ``_partial_``
would not do: Hydra's target policy imports the target's module again when the partial is called.)
"""

import fcntl
import os
import sys
from pathlib import Path

_held: dict[str, int] = {}  # this process's slot, and the descriptor that holds its lock (left open)


def visible_gpus() -> str:
    """The GPUs this process may use, in CUDA_VISIBLE_DEVICES form: that variable where it is set (indices, UUIDs
    or MIG names), else ``0,1,...`` for the GPUs torch counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return ",".join(g.strip() for g in listed.split(",") if g.strip())
    import torch

    return ",".join(str(i) for i in range(torch.cuda.device_count()))


def parallel_jobs() -> int:
    """local.yaml's n_jobs: one job at a time per visible GPU, or joblib's -1 (one per CPU core) without a GPU."""
    gpus = visible_gpus()
    return len(gpus.split(",")) if gpus else -1


def register_resolvers() -> None:
    """``${fusetune.visible_gpus:}`` and ``${fusetune.parallel_jobs:}`` (local.yaml)."""
    from omegaconf import OmegaConf

    for name, resolver in (("fusetune.visible_gpus", visible_gpus), ("fusetune.parallel_jobs", parallel_jobs)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def claim_slot(folder: str | Path) -> int:
    """The lowest slot number that no other live process holds; this process holds it until it exits."""
    if "slot" in _held:
        return _held["slot"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slot = 0
    while True:
        fd = os.open(folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            slot += 1
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held.update(slot=slot, fd=fd)
        return slot


def use_one_gpu(gpus: str, slots_dir: str) -> str | None:
    """Make one of ``gpus`` (CUDA_VISIBLE_DEVICES form) the only GPU this process sees, by the slot it claims in
    ``slots_dir``; with fewer than two, nothing. Before CUDA starts in this process, or it has no effect."""
    listed = [g for g in str(gpus or "").split(",") if g]
    if len(listed) < 2:
        return None
    slot = claim_slot(slots_dir)
    gpu = listed[slot % len(listed)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    print(f"fusetune: worker {os.getpid()} runs its jobs on GPU {gpu} (slot {slot})", file=sys.stderr, flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # this function did not travel by value (module doc)
        print(f"fusetune: warning: CUDA started in worker {os.getpid()} before its GPU was chosen", file=sys.stderr)
    return gpu


class OneGPUPerWorker:
    """``hydra.launcher.initializer`` (local.yaml): joblib hands it to loky, which calls it in each new worker."""

    def __init__(self, gpus: str, slots_dir: str) -> None:
        self.gpus = str(gpus or "")
        self.slots_dir = str(slots_dir)

    def __call__(self) -> str | None:
        return use_one_gpu(self.gpus, self.slots_dir)

    def __repr__(self) -> str:
        return f"OneGPUPerWorker(gpus={self.gpus!r}, slots_dir={self.slots_dir!r})"


def _pickle_by_value() -> None:
    import importlib

    for name in ("cloudpickle", "joblib.externals.cloudpickle"):  # loky's pickler: joblib >= 1.6, and older joblib
        try:
            importlib.import_module(name).register_pickle_by_value(sys.modules[__name__])
        except ImportError:
            pass


_pickle_by_value()
