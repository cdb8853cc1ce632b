"""Training of a bundle's maps in worker processes: each nominal map, then its variations."""

from __future__ import annotations

__all__ = ["MAX_DEFAULT_WORKERS", "MapJob", "fit_map_job", "resolve_workers", "train_maps"]

import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapJob:
    """One map to fit: the keyword arguments of :func:`coffea_otcal.ot.fit_ot_map`.

    Attributes:
        key: the map's name in the bundle, e.g. ``(5, "nominal")`` or ``(5, "em_prior_1_up")``.
        fit: keyword arguments of ``fit_ot_map`` (arrays, ``config`` as a dict, ``seed``,
            ``device``, ``checkpoint_dir``, ``name``); ``init_from`` is filled in by
            :func:`train_maps` for variations.
        variations: jobs warm-started from this one's result (a nominal map's variations).
    """

    key: tuple[int, str]
    fit: Mapping[str, Any]
    variations: Sequence[MapJob] = field(default_factory=tuple)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


#: Default cap on worker processes: each holds torch and its data; beyond a few more than
#: the nominal maps, extra processes only shorten the variations' last wave.
MAX_DEFAULT_WORKERS = 8


def resolve_workers(workers: int | None, n_maps: int, device: str) -> tuple[int, int]:
    """``(processes, torch threads per process)`` for ``workers``.

    ``None``: one process per CPU, at most :data:`MAX_DEFAULT_WORKERS`, the CPUs shared
    out as threads. On CUDA the maps train one after the other in this process (one
    device). Small ILR maps use two threads poorly (1.33x faster than one thread on the
    2-core CPU of ``docs/ot.md``), so each CPU runs its own map where there are enough.
    """
    cpus = _cpus()
    if device.startswith("cuda"):
        return 1, 0
    wanted = workers if workers is not None else min(cpus, MAX_DEFAULT_WORKERS)
    procs = max(1, min(wanted, n_maps))
    return procs, max(1, cpus // procs)


def fit_map_job(fit: Mapping[str, Any], init_from: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fit one map (in this process or in a worker) and return its JSON-able export."""
    from coffea_otcal.kernels import FittedMap
    from coffea_otcal.ot import OTConfig, fit_ot_map

    kwargs = dict(fit)
    kwargs["config"] = OTConfig.model_validate(kwargs["config"])
    init = None if init_from is None else FittedMap(init_from)
    return fit_ot_map(init_from=init, **kwargs).export()


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _quiet(job: MapJob) -> dict[str, Any]:
    """The job's arguments without a progress bar (workers draw none: the caller has one)."""
    return {**job.fit, "progress": False}


def _keys(jobs: Sequence[MapJob]) -> list[tuple[int, str]]:
    """Every job's key, each job followed by its variations (the order of the result)."""
    return [key for job in jobs for key in (job.key, *_keys(job.variations))]


def _train_here(jobs: Sequence[MapJob], init: Mapping[str, Any] | None,
                out: dict[tuple[int, str], dict[str, Any]]) -> None:
    for job in jobs:
        out[job.key] = fit_map_job(job.fit, init)
        _train_here(job.variations, out[job.key], out)


def train_maps(
    jobs: Sequence[MapJob], workers: int | None = None, device: str = "cpu", progress: bool = True
) -> dict[tuple[int, str], dict[str, Any]]:
    """Fit every job and its variations; returns the exports in the order of the jobs.

    With more than one worker the maps train in ``spawn``-ed processes: all nominal maps at
    once, and each variation as soon as the map it starts from is done. Every map is fitted
    from its own seed, so the result does not depend on the order in which workers finish;
    the thread layout may change float rounding, not the numbers that matter.

    Arguments:
        jobs: the nominal maps, each with its variations.
        workers: processes (None: one per CPU, at most :data:`MAX_DEFAULT_WORKERS`; 1: this
            process, one map after the other).
        device: the resolved torch device type (``"cpu"``, ``"cuda"``...).
        progress: a bar over the maps (worker processes draw none of their own).

    Returns:
        ``{key: export}`` for every job and variation, jobs first then their variations.
    """
    keys = _keys(jobs)
    procs, threads = resolve_workers(workers, len(keys), device)
    out: dict[tuple[int, str], dict[str, Any]] = {}
    if procs == 1:
        _train_here(jobs, None, out)
    else:
        logger.info("training %d maps in %d processes x %d threads", len(keys), procs, threads)
        with (
            ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_init_worker, initargs=(threads,)) as pool,
            tqdm(total=len(keys), desc="OT maps", unit="map", disable=not progress) as bar,
        ):
            pending: dict[Future[dict[str, Any]], MapJob] = {
                pool.submit(fit_map_job, _quiet(job)): job for job in jobs
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    try:
                        out[job.key] = future.result()
                    except BrokenProcessPool as exc:
                        msg = (
                            f"the OT worker processes died while training map {job.key}: with "
                            "'spawn', a script that trains maps must guard its entry point with "
                            "`if __name__ == \"__main__\":`; otherwise look for a worker killed "
                            "for memory, or train in this process with workers=1 (ot.workers: 1)"
                        )
                        raise RuntimeError(msg) from exc
                    except BaseException:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                    bar.update()
                    for var in job.variations:
                        pending[pool.submit(fit_map_job, _quiet(var), out[job.key])] = var
    return {key: out[key] for key in keys}
