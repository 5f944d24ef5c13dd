"""Pay the numba backend's first-use compile cost once, ahead of time: ``fastkl warmup``.

numba compiles a kernel the first time it meets a new combination of argument types and
keeps the machine code in its on-disk cache, so only the first call of each kernel family,
per dtype, in a fresh installation is slow (several seconds in all). :func:`warmup` calls
every kernel family — Monte Carlo terms, partials (mean / stats / RL reductions) and
gradients, with and without masks, importance weights and clamps, and every logits op —
once per dtype on a small and a large input (the two take the serial and the threaded
compilations), so later processes load every kernel from the cache. The Cython backend
needs no warm-up (it is compiled at install time); it is exercised too, which loads its
extension.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np

from .backends import available_backends

#: the dtypes warmed by default: what log-probs and logits arrive in
DEFAULT_DTYPES = ("float32", "float64")
_SMALL, _LARGE = 1_000, 65_536  # element counts on either side of the serial/threaded cut


def _mc_jobs(backend: str, dt: np.dtype) -> list[tuple[str, Callable[[], object]]]:
    from .mc import kl_mc, kl_mc_grad, kl_mc_stats

    rng = np.random.default_rng(0)
    jobs = []
    for n in (_SMALL, _LARGE):
        rows = 8
        q = rng.normal(-2.0, 1.0, size=(rows, n // rows)).astype(dt)
        p = (q + rng.normal(0.0, 0.1, size=q.shape)).astype(dt)
        mask = np.arange(q.shape[1])[None, :] < rng.integers(1, q.shape[1], size=rows)[:, None]
        iw = (0.01 * rng.normal(size=q.shape)).astype(dt)
        clamps = {"clamp_log_ratio": (-20.0, 20.0), "clamp_value": (-10.0, 10.0)}
        for name, fn, kw in (
            ("kl_mc", kl_mc, {}),
            ("kl_mc none", kl_mc, {"reduction": "none"}),
            ("kl_mc mask clamps", kl_mc, {"mask": mask, "reduction": "token-mean", **clamps}),
            ("kl_mc seq-mean", kl_mc, {"mask": mask, "reduction": "seq-mean-token-mean"}),
            ("kl_mc weights log_iw", kl_mc, {"mask": mask.astype(dt), "log_iw": iw,
                                             "reduction": "token-mean"}),
            ("kl_mc none mask", kl_mc, {"mask": mask, "reduction": "none"}),
            ("kl_mc_stats", kl_mc_stats, {}),
            ("kl_mc_stats mask", kl_mc_stats, {"mask": mask}),
            ("kl_mc_grad", kl_mc_grad, {}),
            ("kl_mc_grad mask log_iw", kl_mc_grad, {"mask": mask, "log_iw": iw}),
        ):
            jobs.append((f"{name} {n}", partial(fn, q, p, backend=backend, **kw)))
    return jobs


def _half_jobs(backend: str, dt: np.dtype) -> list[tuple[str, Callable[[], object]]]:
    """float16 / bfloat16 inputs: the kernels that read them in place (the float32-lane
    means, sums and stats; numba compiles these once more per 16-bit format). Every other
    option widens 16-bit inputs to float32 and runs the float32 kernels."""
    from .mc import kl_mc, kl_mc_stats

    rng = np.random.default_rng(0)
    jobs = []
    for n in (_SMALL, _LARGE):
        rows = 8
        q = rng.normal(-2.0, 1.0, size=(rows, n // rows)).astype(dt)
        p = (q.astype(np.float32) + rng.normal(0.0, 0.1, size=q.shape)).astype(dt)
        mask = np.arange(q.shape[1])[None, :] < rng.integers(1, q.shape[1], size=rows)[:, None]
        for name, fn, kw in (
            ("kl_mc", kl_mc, {}),
            ("kl_mc mask", kl_mc, {"mask": mask, "reduction": "token-mean"}),
            ("kl_mc_stats", kl_mc_stats, {}),
            ("kl_mc_stats mask", kl_mc_stats, {"mask": mask}),
        ):
            jobs.append((f"{name} {n}", partial(fn, q, p, backend=backend, **kw)))
    return jobs


def _warm_dtype(d: str) -> np.dtype:
    """A ``dtypes`` entry as a numpy dtype: a float dtype, or "bfloat16" (``ml_dtypes``)."""
    from ._checks import bfloat16_dtype

    if d == "bfloat16":
        bf16 = bfloat16_dtype()
        if bf16 is None:
            raise ValueError("dtypes: 'bfloat16' needs the optional package ml_dtypes")
        return bf16
    try:
        dt = np.dtype(d)
    except TypeError as exc:
        raise ValueError(f"dtypes: {d!r} is not a dtype") from exc
    if dt.kind != "f":
        raise ValueError(f"dtypes: {d!r} is not a float dtype")
    return dt


def _logits_jobs(backend: str, dt: np.dtype) -> list[tuple[str, Callable[[], object]]]:
    from .logits import (
        entropy_logits,
        jsd_logits,
        jsd_logits_grad,
        kl_logits,
        kl_logits_grad,
        token_logprobs,
        token_logprobs_grad,
    )

    rng = np.random.default_rng(1)
    jobs = []
    for rows, vocab in ((2, 500), (4, 32_000)):
        a = rng.normal(size=(rows, vocab)).astype(dt)
        b = (a + 0.3 * rng.normal(size=a.shape)).astype(dt)
        tok = rng.integers(0, vocab, size=rows)
        for name, fn, args, kw in (
            ("kl_logits", kl_logits, (a, b), {}),
            ("kl_logits T", kl_logits, (a, b), {"temperature": 2.0}),
            ("kl_logits strided", kl_logits, (a[:, ::2], b[:, ::2]), {}),
            ("jsd_logits", jsd_logits, (a, b), {}),
            ("entropy_logits", entropy_logits, (a,), {}),
            ("token_logprobs", token_logprobs, (a, tok), {}),
            ("kl_logits_grad", kl_logits_grad, (a, b), {}),
            ("jsd_logits_grad both", jsd_logits_grad, (a, b), {"wrt": "both"}),
            ("token_logprobs_grad", token_logprobs_grad, (a, tok), {}),
        ):
            jobs.append((f"{name} {vocab}", partial(fn, *args, backend=backend, **kw)))
    return jobs


def warmup(
    dtypes: Iterable[str] = DEFAULT_DTYPES,
    backends: Iterable[str] | None = None,
    *,
    progress: bool | None = None,
) -> dict[str, float]:
    """Compile (or load from numba's on-disk cache) every kernel family for ``dtypes``.

    Parameters
    ----------
    dtypes : float dtype names, default ``("float32", "float64")``; also "float16" and
        "bfloat16" (with ``ml_dtypes``), whose means, sums and stats numba compiles once more
        (their other options run the float32 kernels).
    backends : backend names (default: every available compiled backend).
    progress : a tqdm progress bar on stderr (None: only when stderr is a terminal).

    Returns
    -------
    dict mapping ``"backend dtype"`` to the seconds it took. A second run (or any later
    process using the same cache) takes well under a second.
    """
    dts = [_warm_dtype(d) for d in dtypes]
    avail = available_backends()
    if backends is None:
        names = [b for b in avail if b != "numpy"]
    else:
        names = list(backends)
        for b in names:
            if b not in avail:
                raise ValueError(f"backends: {b!r} is not available here (available: {avail})")
    plan = [(b, dt, _half_jobs(b, dt) if dt.itemsize == 2 else _mc_jobs(b, dt)
             + _logits_jobs(b, dt)) for b in names for dt in dts]
    total = sum(len(jobs) for _, _, jobs in plan)
    from ._core import progress_bar as _progress

    times: dict[str, float] = {}
    bar = _progress(total, "fastkl warmup", progress, "kernels")
    try:
        for b, dt, jobs in plan:
            t0 = time.perf_counter()
            for label, job in jobs:
                if bar is not None:
                    bar.set_postfix_str(f"{b} {dt.name} {label}", refresh=False)
                job()
                if bar is not None:
                    bar.update(1)
            times[f"{b} {dt.name}"] = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    return times
