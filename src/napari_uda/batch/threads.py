"""PyTorch threads of a batch worker process: one seam, so the shared thread policy can take over.

Dask's nanny starts workers with ``OMP_NUM_THREADS=1``; PyTorch, which holds the GIL while it
computes, needs its intra-op threads set explicitly: each worker gets a share of the cores (the
cores of its machine divided by the worker processes on it). Local workers also start with the
shared thread policy's environment (:func:`napari_uda.core.threads.openmp_environment`: that
many OpenMP threads, which do not spin while they wait).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ..core.threads import openmp_environment, usable_cores

__all__ = ["openmp_environment", "usable_cores"]


def threads_per_worker(cores: int, workers: int) -> int:
    """``cores // workers``, at least 1."""
    return max(1, cores // max(1, workers))


def threads_for_cluster(cores_by_worker: Mapping[str, int], host_of: Mapping[str, str]) -> int:
    """For an existing cluster: the smallest share any worker gets of its host's cores
    (``cores_by_worker``: worker address -> cores; ``host_of``: address -> host)."""
    per_host = Counter(host_of.values())
    shares = [
        threads_per_worker(cores, per_host[host_of[address]])
        for address, cores in cores_by_worker.items()
    ]
    return min(shares) if shares else 1


def set_torch_threads(threads: int | None) -> None:
    """Set this process's PyTorch intra-op threads (None: leave them)."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
