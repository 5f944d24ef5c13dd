"""One registry of implementations shared by ``bench_mc.py`` (the report) and
``test_bench_mc.py`` (the pytest-benchmark suite), in the style of numbagg's ``COMPARISONS``.

An implementation is ``(impl, op, fn)`` where ``fn(case)`` computes ``op`` on the arrays of a
``Case`` and returns a float (or a tuple of floats). Every implementation of an op computes
the same quantity, so each one is checked against ``reference(op, case)`` before it is timed.

Ops (samples x ~ q, ``l = logp - logq``):

* ``k1``, ``k2``, ``k3``: mean over all pairs of ``-l``, ``l**2/2``, ``exp(l) - 1 - l``.
* ``stats k3``: (mean, sample std) of the k3 terms (``fastkl.kl_mc_stats``).
* ``seq-mean-token-mean k3``: on a 2-D ``[rows, cols]`` reshape with a padding mask, the
  masked mean of the k3 terms per row, then the mean over rows with at least one token.
* ``none k3``: the per-sample k3 terms (an array in the input precision).
* ``grad k3``: the k3 mean and its gradient with respect to ``logq``, ``(1 - r) / n``.

Peers: the numpy textbook formulas (what users write today) and the same formulas in torch
(CPU) when torch is importable. scipy has no Monte Carlo KL estimator (``rel_entr`` computes
``p log(p/q)`` over full distributions, another quantity), so it is not a peer here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fastkl._estimators import ESTIMATORS, K3

# op name -> row of fastkl's estimator table: the forward estimators (k1, k2, k3), whose op is
# the mean of their terms
_EST = {e.label: e for e in ESTIMATORS if not e.reverse}
OPS = (*_EST, "stats k3", "seq-mean-token-mean k3", "none k3", "grad k3")
SEQ_COLS = 500  # tokens per row of the 2-D reshape
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- data


@dataclass
class Case:
    """The arrays every implementation reads: 1-D ``logq``, ``logp`` (contiguous) and their
    2-D ``[rows, SEQ_COLS]`` views ``logq2``, ``logp2`` with a bool padding ``mask2``."""

    logq: np.ndarray
    logp: np.ndarray
    logq2: np.ndarray
    logp2: np.ndarray
    mask2: np.ndarray

    @property
    def n(self) -> int:
        return self.logq.size

    def input_bytes(self, op: str) -> int:
        if op.startswith("seq-mean"):
            return self.logq2.nbytes + self.logp2.nbytes + self.mask2.nbytes
        return self.logq.nbytes + self.logp.nbytes


def make_case(n: int, dtype="float32", seed: int = 0, mu: float = 1.0) -> Case:
    """Schulman's setting: x ~ q = N(0,1), p = N(mu,1); log-densities in ``dtype``.

    ``n`` is rounded down to a multiple of ``SEQ_COLS`` when it is at least that large (so
    the 2-D view needs no copy); each row of the 2-D view keeps a random-length prefix of
    tokens (some rows empty, some full), like right-padded RL batches.
    """
    n = int(n)
    cols = min(SEQ_COLS, max(n, 1))
    n = (n // cols) * cols
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    logq = (-0.5 * x * x - _LOG_SQRT_2PI).astype(dtype)
    d = x - mu
    del x
    logp = (-0.5 * d * d - _LOG_SQRT_2PI).astype(dtype)
    del d
    rows = n // cols
    lengths = rng.integers(0, cols + 1, size=rows)
    if rows >= 3:
        lengths[0], lengths[1] = 0, cols  # an empty row and a full one
    mask2 = np.arange(cols)[None, :] < lengths[:, None]
    return Case(logq, logp, logq.reshape(rows, cols), logp.reshape(rows, cols), mask2)


# --------------------------------------------------------------------------- reference

_CHUNK = 1 << 20


def _ref_terms(logq, logp, est: int) -> np.ndarray:
    from fastkl.backends.numpy import term_and_grad  # the spec, in float64

    l = logp.astype(np.float64) - logq.astype(np.float64)
    return term_and_grad(l, est)


def reference(op: str, case: Case):
    """The exact value of ``op`` for the case's arrays: float64 terms from the numpy
    reference backend's formulas, summed in float64 chunk by chunk (bounded memory)."""
    if op in _EST:
        est = _EST[op].code
        total = 0.0
        for i in range(0, case.n, _CHUNK):
            total += float(np.sum(_ref_terms(case.logq[i:i + _CHUNK], case.logp[i:i + _CHUNK],
                                             est)))
        return total / case.n if case.n else math.nan
    if op == "stats k3":
        # two passes (mean, then squared deviations) so the std has no cancellation
        mean = reference("k3", case)
        m2 = 0.0
        for i in range(0, case.n, _CHUNK):
            t = _ref_terms(case.logq[i:i + _CHUNK], case.logp[i:i + _CHUNK], K3)
            m2 += float(np.sum((t - mean) ** 2))
        return mean, math.sqrt(m2 / (case.n - 1)) if case.n > 1 else math.nan
    if op in ("none k3", "grad k3"):
        t = np.empty(case.n)
        g = np.empty(case.n)
        for i in range(0, case.n, _CHUNK):
            sl = slice(i, i + _CHUNK)
            l = case.logp[sl].astype(np.float64) - case.logq[sl].astype(np.float64)
            t[sl] = _ref_terms(case.logq[sl], case.logp[sl], K3)
            g[sl] = -np.expm1(l) / case.n
        return t if op == "none k3" else (float(np.mean(t)), g)
    if op == "seq-mean-token-mean k3":
        rows = case.logq2.shape[0]
        step = max(1, _CHUNK // max(case.logq2.shape[1], 1))
        sums, counts = np.zeros(rows), np.zeros(rows)
        for i in range(0, rows, step):
            t = _ref_terms(case.logq2[i:i + step], case.logp2[i:i + step], K3)
            m = case.mask2[i:i + step]
            sums[i:i + step] = np.where(m, t, 0.0).sum(axis=1)
            counts[i:i + step] = m.sum(axis=1)
        has = counts > 0
        return float(np.mean(sums[has] / counts[has])) if has.any() else math.nan
    raise ValueError(f"unknown op {op!r}")


def matches(result, ref, rtol: float = 1e-5) -> bool:
    """``result`` equals ``ref`` (float or tuple of floats) to ``rtol``; NaN matches NaN."""
    a = np.atleast_1d(np.asarray(result, dtype=np.float64))
    b = np.atleast_1d(np.asarray(ref, dtype=np.float64))
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=0.0, equal_nan=True))


def _close_arrays(got, ref) -> bool:
    """Per-element: rtol 1e-5, or 1e-6 of the largest |ref| (the float32 textbook formula
    loses all digits of the tiniest terms, which is the point of fastkl, not a mismatch)."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return got.shape == ref.shape and bool(np.allclose(got, ref, rtol=1e-5, atol=1e-6 * scale))


def matches_op(op: str, result, ref) -> bool:
    """``matches`` for the scalar ops; arrays (``none k3``) and (value, gradient) pairs
    (``grad k3``) element by element."""
    if op == "none k3":
        return _close_arrays(result, ref)
    if op == "grad k3":
        return matches(result[0], ref[0]) and _close_arrays(result[1], ref[1])
    return matches(result, ref)


# --------------------------------------------------------------------------- implementations


@dataclass(frozen=True)
class Impl:
    impl: str  # "numpy textbook", "fastkl numba", ...
    op: str
    fn: Callable[[Case], object]
    kind: str  # "peer" or "fastkl"

    @property
    def id(self) -> str:
        return f"{self.impl}|{self.op}"


def _numpy_textbook() -> dict[str, Callable[[Case], object]]:
    def k1(c):
        return float(np.mean(-(c.logp - c.logq)))

    def k2(c):
        l = c.logp - c.logq
        return float(np.mean(0.5 * l * l))

    def k3(c):
        l = c.logp - c.logq
        return float(np.mean(np.exp(l) - 1 - l))

    def stats_k3(c):
        l = c.logp - c.logq
        t = np.exp(l) - 1 - l
        return float(np.mean(t)), float(np.std(t, ddof=1))

    def seq_k3(c):
        l = c.logp2 - c.logq2
        t = np.exp(l) - 1 - l
        m = c.mask2
        cnt = m.sum(axis=1)
        per_row = (t * m).sum(axis=1)[cnt > 0] / cnt[cnt > 0]
        return float(per_row.mean())

    def none_k3(c):
        l = c.logp - c.logq
        return np.exp(l) - 1 - l

    def grad_k3(c):
        l = c.logp - c.logq
        r = np.exp(l)
        return float(np.mean(r - 1 - l)), (1 - r) / c.n

    def abs_(c):  # verl's "abs" penalty, averaged
        return float(np.mean(np.abs(c.logp - c.logq)))

    return {"k1": k1, "k2": k2, "k3": k3, "abs": abs_, "stats k3": stats_k3,
            "seq-mean-token-mean k3": seq_k3, "none k3": none_k3, "grad k3": grad_k3}


def _torch_textbook(torch) -> dict[str, Callable[[Case], object]]:
    t_ = torch.from_numpy  # zero-copy views of the same arrays

    def k1(c):
        return float(torch.mean(-(t_(c.logp) - t_(c.logq))))

    def k2(c):
        l = t_(c.logp) - t_(c.logq)
        return float(torch.mean(0.5 * l * l))

    def k3(c):
        l = t_(c.logp) - t_(c.logq)
        return float(torch.mean(torch.exp(l) - 1 - l))

    def stats_k3(c):
        l = t_(c.logp) - t_(c.logq)
        t = torch.exp(l) - 1 - l
        return float(t.mean()), float(t.std())

    def seq_k3(c):
        l = t_(c.logp2) - t_(c.logq2)
        t = torch.exp(l) - 1 - l
        m = t_(c.mask2)
        cnt = m.sum(dim=1)
        has = cnt > 0
        per_row = (t * m).sum(dim=1)[has] / cnt[has]
        return float(per_row.mean())

    def none_k3(c):
        l = t_(c.logp) - t_(c.logq)
        return (torch.exp(l) - 1 - l).numpy()

    def grad_k3(c):  # autograd, as a training loop gets it
        lq = t_(c.logq).clone().requires_grad_(True)
        l = t_(c.logp) - lq
        v = torch.mean(torch.exp(l) - 1 - l)
        v.backward()
        return float(v.detach()), lq.grad.numpy()

    def abs_(c):
        return float(torch.mean(torch.abs(t_(c.logp) - t_(c.logq))))

    return {"k1": k1, "k2": k2, "k3": k3, "abs": abs_, "stats k3": stats_k3,
            "seq-mean-token-mean k3": seq_k3, "none k3": none_k3, "grad k3": grad_k3}


def _fastkl(backend: str) -> dict[str, Callable[[Case], object]]:
    import fastkl

    def mean_of(est):
        def fn(c):
            return fastkl.kl_mc(c.logq, c.logp, est, backend=backend)
        return fn

    def stats_k3(c):
        s = fastkl.kl_mc_stats(c.logq, c.logp, "k3", backend=backend)
        return s.mean, s.std

    def seq_k3(c):
        return fastkl.kl_mc(c.logq2, c.logp2, "k3", reduction="seq-mean-token-mean",
                            mask=c.mask2, backend=backend)

    def none_k3(c):
        return fastkl.kl_mc(c.logq, c.logp, "k3", reduction="none", backend=backend)

    def grad_k3(c):
        return fastkl.kl_mc_grad(c.logq, c.logp, "k3", backend=backend)

    return {**{op: mean_of(e.name) for op, e in _EST.items()},
            "stats k3": stats_k3, "seq-mean-token-mean k3": seq_k3, "none k3": none_k3,
            "grad k3": grad_k3}


def torch_module():
    """torch if importable (CPU formulas only), else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def fastkl_backends() -> list[str]:
    import fastkl

    return list(fastkl.available_backends())


def implementations(backends: list[str] | None = None, peers: bool = True) -> list[Impl]:
    """Every (implementation, op): numpy textbook, torch textbook (if importable), then
    each fastkl backend (default: all available)."""
    out: list[Impl] = []
    groups: list[tuple[str, str, dict]] = []
    if peers:
        groups.append(("numpy textbook", "peer", _numpy_textbook()))
        torch = torch_module()
        if torch is not None:
            groups.append(("torch textbook", "peer", _torch_textbook(torch)))
    for be in fastkl_backends() if backends is None else backends:
        groups.append((f"fastkl {be}", "fastkl", _fastkl(be)))
    for name, kind, fns in groups:
        for op in OPS:
            out.append(Impl(name, op, fns[op], kind))
    return out


# --------------------------------------------------------------------------- roofline


def _numpy_read(c: Case) -> float:
    return float(np.add.reduce(c.logq)) + float(np.add.reduce(c.logp))


_NUMBA_SUM = None


def _numba_read_fn():
    """A parallel sum of both arrays in numba (fastmath, so it vectorizes): a streaming read
    of the same bytes. None if numba is missing."""
    global _NUMBA_SUM
    if _NUMBA_SUM is None:
        try:
            import numba
        except ImportError:
            _NUMBA_SUM = False
            return None

        @numba.njit(parallel=True, fastmath=True, nogil=True)
        def _sum2(a, b):
            s = 0.0
            for i in numba.prange(a.size):
                s += a[i] + b[i]
            return s

        _NUMBA_SUM = _sum2
    return _NUMBA_SUM or None


def roofline_impls() -> list[tuple[str, Callable[[Case], float]]]:
    """Streaming reads of ``logq`` and ``logp`` (the bytes every op must read)."""
    out = [("np.add.reduce", _numpy_read)]
    nb = _numba_read_fn()
    if nb is not None:
        out.append(("numba prange sum", lambda c: float(nb(c.logq, c.logp))))
    return out


def roofline_reference(case: Case) -> float:
    return float(np.sum(case.logq, dtype=np.float64) + np.sum(case.logp, dtype=np.float64))
