"""How many transcriber workers a host runs, and how many threads each gets: pure, no I/O.

On a CPU, one Whisper process with many intra-op threads scales poorly (the decoder's small matrix
products gain little past 2 threads), so several processes with few threads each decode more audio
per second; each worker holds its own model. On GPUs, one worker per GPU with large batches.
`bench/threads.py` measures the CPU side; README ("Workers per host") has the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from jetscribe.shared.config import ConfigError

# Every thread pool a worker may start: CTranslate2 (also told through cpu_threads), and the BLAS of numpy.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CPU_THREADS_PER_WORKER = 1  # the default split on a CPU host: one worker per core


@dataclass(frozen=True)
class WorkerPlan:
    transcribers: int
    threads: int  # CPU threads of each worker: cpu_threads and the OMP/MKL/OpenBLAS pools
    device: str  # "cpu" or "cuda"
    device_indexes: tuple[int, ...] = ()  # the GPU of each worker (cuda only)

    def describe(self, cores: int) -> str:
        """One line for the log: what runs where."""
        each = f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} each of {cores} cores"
        if self.device == "cuda":
            return f"{self.transcribers} transcribers on cuda (GPUs {list(self.device_indexes)}), {each}"
        return f"{self.transcribers} transcriber{'s' if self.transcribers != 1 else ''} on cpu, {each}"


def plan_workers(
    cores: int,
    device: str,
    gpus: int = 0,
    *,
    transcribers: int | None = None,
    threads: int | None = None,
    partitions: int = 16,
) -> WorkerPlan:
    """Workers and threads for a host with `cores` usable cores and `gpus` GPUs, `device` already resolved
    ("cpu" or "cuda"). `transcribers` and `threads` are what the user asked for (None: choose). Without a
    choice, N x threads <= cores; never more workers than partitions (a worker without one idles)."""
    if cores < 1:
        raise ConfigError(f"cores must be at least 1, got {cores}")
    if transcribers is not None and not 1 <= transcribers <= partitions:
        raise ConfigError(
            f"{transcribers} transcribers: use 1 to {partitions} (there are {partitions} AUDIO partitions, "
            "JETSCRIBE_PARTITIONS, and a worker without one has nothing to do)"
        )
    if threads is not None and threads < 1:
        raise ConfigError(f"JETSCRIBE_CPU_THREADS={threads}: use at least 1 (or 0 to let jetscribe up choose)")
    if device == "cuda":
        if gpus < 1:
            raise ConfigError("device cuda needs at least one GPU")
        count = transcribers or min(gpus, partitions)
        return WorkerPlan(count, threads or max(1, cores // count), "cuda", tuple(i % gpus for i in range(count)))
    if device != "cpu":
        raise ConfigError(f"device {device!r}: plan for cpu or cuda")
    if transcribers is None:
        transcribers = max(1, min(partitions, cores // (threads or CPU_THREADS_PER_WORKER)))
    return WorkerPlan(transcribers, threads or max(1, cores // transcribers), "cpu")


def thread_env(threads: int) -> dict[str, str]:
    """The environment that holds one worker to `threads` threads."""
    return {"JETSCRIBE_CPU_THREADS": str(threads), **dict.fromkeys(THREAD_VARIABLES, str(threads))}
