"""The full-vocabulary half of the benchmark registry (``registry.py`` has the Monte Carlo
half): implementations of the logits ops, shared by ``bench_logits.py`` (the report) and
``test_bench_logits.py`` (the pytest-benchmark suite).

An implementation is an ``Impl`` (from ``registry``) whose ``fn(case)`` computes ``op`` on the
arrays of a ``LogitsCase`` and returns a float64 array of per-row values (or, for
``kl_grad``, a ``(mean KL, gradient)`` pair). Every implementation of an op computes the same
quantity and is checked against ``reference(op, case)`` before it is timed.

Ops over rows ``a`` (logits of P) and ``b`` (logits of Q), ``[rows, vocab]``, temperature 1:

* ``kl``: KL(P||Q) per row;  ``jsd``: JSD_0.5(P, Q) per row;  ``entropy``: H(P) per row;
* ``token``: log Q[row, token] per row;
* ``kl_grad``: the mean KL over rows and its gradient ``(Q - P) / rows`` w.r.t. ``b``.

Peers (what users write today): numpy with ``scipy.special.logsumexp`` (the log-softmax way),
scipy's own functions (``special.rel_entr``, ``stats.entropy``,
``spatial.distance.jensenshannon``), and torch CPU (``F.kl_div`` on ``log_softmax``,
``log_softmax`` + ``gather``, autograd for the gradient) when torch is importable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from registry import Impl, torch_module

OPS = ("kl", "jsd", "entropy", "token", "kl_grad")
_TWO_ARRAYS = ("kl", "jsd", "kl_grad")


@dataclass
class LogitsCase:
    """``a``, ``b``: C-contiguous ``[rows, vocab]`` logits; ``tokens``: int64 ``[rows]``."""

    a: np.ndarray
    b: np.ndarray
    tokens: np.ndarray

    @property
    def rows(self) -> int:
        return self.a.shape[0]

    @property
    def vocab(self) -> int:
        return self.a.shape[1]

    @property
    def n(self) -> int:
        return self.a.size

    def input_bytes(self, op: str) -> int:
        return self.a.nbytes + (self.b.nbytes if op in _TWO_ARRAYS else 0)


def make_case(rows: int, vocab: int, dtype="float32", seed: int = 0) -> LogitsCase:
    """Teacher/student-like logits: ``a ~ 2 + 3 N(0,1)``, ``b = 0.8 a + N(0,1)`` (KL per row
    around 0.5), made a block of rows at a time so the float64 temporaries stay small. (The
    offset changes no result but keeps the roofline's plain sum of the inputs away from 0,
    where its float32 rounding would fail the check.)"""
    rng = np.random.default_rng(seed)
    a = np.empty((rows, vocab), dtype=dtype)
    b = np.empty((rows, vocab), dtype=dtype)
    step = max(1, (1 << 22) // max(vocab, 1))
    for i in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - i), vocab)) * 3.0 + 2.0
        a[i:i + step] = x
        b[i:i + step] = 0.8 * x + rng.standard_normal(x.shape)
    tokens = rng.integers(0, vocab, size=rows)
    return LogitsCase(a, b, tokens)


# --------------------------------------------------------------------------- reference


def reference(op: str, case: LogitsCase):
    """The float64 value of ``op``: fastkl's numpy reference backend (the spec), a block of
    rows at a time."""
    from fastkl.backends import numpy as numpy_ref

    rows, step = case.rows, max(1, (1 << 21) // max(case.vocab, 1))
    out = np.empty(rows)
    if op == "token":
        for i in range(0, rows, step):
            sl = slice(i, i + step)
            numpy_ref.logits_token(case.b[sl], case.tokens[sl], 1.0, -100, out[sl])
        return out
    code = {"kl": 0, "jsd": 1, "entropy": 2, "kl_grad": 0}[op]
    for i in range(0, rows, step):
        sl = slice(i, i + step)
        numpy_ref.logits_rows(case.a[sl], case.b[sl], code, 0.5, 1.0, False, None, out[sl])
    if op != "kl_grad":
        return out
    grad = np.empty(case.b.shape, dtype=np.float64)
    scale = np.full(rows, 1.0 / rows)
    for i in range(0, rows, step):
        sl = slice(i, i + step)
        numpy_ref.logits_grad(case.a[sl], case.b[sl], 0, 0.5, 1.0, scale[sl], np.empty(len(
            out[sl])), None, grad[sl])
    return float(out.mean()), grad


def matches(op: str, result, ref) -> bool:
    """Per-row values within rtol 1e-3 or 1e-5 of the row values' scale (the peers compute
    in the input precision, float32 included); gradients likewise against their scale."""
    if op == "kl_grad":
        (v, g), (rv, rg) = result, ref
        g = np.asarray(g, dtype=np.float64)
        scale = float(np.abs(rg).max()) if rg.size else 0.0
        return (math.isclose(float(v), rv, rel_tol=1e-4, abs_tol=1e-7)
                and g.shape == rg.shape
                and bool(np.allclose(g, rg, rtol=1e-3, atol=1e-5 * scale)))
    got = np.asarray(result, dtype=np.float64)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return got.shape == ref.shape and bool(
        np.allclose(got, ref, rtol=1e-3, atol=1e-5 * scale, equal_nan=True))


# --------------------------------------------------------------------------- implementations


def _numpy_logsumexp() -> dict[str, Callable]:
    """numpy + ``scipy.special.logsumexp``: materialises the ``[rows, vocab]`` log-softmax."""
    from scipy.special import logsumexp

    def lsm(x):
        return x - logsumexp(x, axis=-1, keepdims=True)

    def kl(c):
        lp, lq = lsm(c.a), lsm(c.b)
        return np.sum(np.exp(lp) * (lp - lq), axis=-1)

    def jsd(c):
        lp, lq = lsm(c.a), lsm(c.b)
        p, q = np.exp(lp), np.exp(lq)
        lm = np.log(0.5 * (p + q))
        return 0.5 * np.sum(p * (lp - lm), axis=-1) + 0.5 * np.sum(q * (lq - lm), axis=-1)

    def entropy(c):
        lp = lsm(c.a)
        return -np.sum(np.exp(lp) * lp, axis=-1)

    def token(c):
        lq = lsm(c.b)
        return np.take_along_axis(lq, c.tokens[:, None], axis=-1)[:, 0]

    def kl_grad(c):
        lp, lq = lsm(c.a), lsm(c.b)
        p, q = np.exp(lp), np.exp(lq)
        kl = np.sum(p * (lp - lq), axis=-1)
        return float(np.mean(kl)), (q - p) / c.rows

    return {"kl": kl, "jsd": jsd, "entropy": entropy, "token": token, "kl_grad": kl_grad}


def _scipy() -> dict[str, Callable]:
    """scipy's own functions on ``softmax`` probabilities (no gradient or token op there)."""
    from scipy.spatial.distance import jensenshannon
    from scipy.special import rel_entr, softmax
    from scipy.stats import entropy as sp_entropy

    def kl(c):
        return np.sum(rel_entr(softmax(c.a, axis=-1), softmax(c.b, axis=-1)), axis=-1)

    def jsd(c):
        return jensenshannon(softmax(c.a, axis=-1), softmax(c.b, axis=-1), axis=-1) ** 2

    def entropy(c):
        return sp_entropy(softmax(c.a, axis=-1), axis=-1)

    return {"kl": kl, "jsd": jsd, "entropy": entropy}


def _torch(torch) -> dict[str, Callable]:
    """torch CPU: ``F.kl_div`` / ``log_softmax`` / ``gather`` / autograd, on zero-copy views."""
    import torch.nn.functional as F

    t_ = torch.from_numpy

    def kl(c):
        lp = F.log_softmax(t_(c.a), dim=-1)
        lq = F.log_softmax(t_(c.b), dim=-1)
        return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).double().numpy()

    def jsd(c):
        lp = F.log_softmax(t_(c.a), dim=-1)
        lq = F.log_softmax(t_(c.b), dim=-1)
        lm = torch.logsumexp(torch.stack([lp, lq]), dim=0) - math.log(2.0)
        v = 0.5 * F.kl_div(lm, lp, log_target=True, reduction="none").sum(-1) + 0.5 * F.kl_div(
            lm, lq, log_target=True, reduction="none").sum(-1)
        return v.double().numpy()

    def entropy(c):
        lp = F.log_softmax(t_(c.a), dim=-1)
        return (-(lp.exp() * lp).sum(-1)).double().numpy()

    def token(c):
        lq = F.log_softmax(t_(c.b), dim=-1)
        return lq.gather(-1, t_(c.tokens)[:, None])[:, 0].double().numpy()

    def kl_grad(c):
        b = t_(c.b).clone().requires_grad_(True)
        lp = F.log_softmax(t_(c.a), dim=-1)
        loss = F.kl_div(F.log_softmax(b, dim=-1), lp, log_target=True, reduction="batchmean")
        loss.backward()
        return float(loss.detach()), b.grad.numpy()

    return {"kl": kl, "jsd": jsd, "entropy": entropy, "token": token, "kl_grad": kl_grad}


def _fastkl(backend: str) -> dict[str, Callable]:
    import fastkl

    def kl(c):
        return fastkl.kl_logits(c.a, c.b, backend=backend)

    def jsd(c):
        return fastkl.jsd_logits(c.a, c.b, 0.5, backend=backend)

    def entropy(c):
        return fastkl.entropy_logits(c.a, backend=backend)

    def token(c):
        return fastkl.token_logprobs(c.b, c.tokens, backend=backend)

    def kl_grad(c):
        return fastkl.kl_logits_grad(c.a, c.b, reduction="mean", backend=backend)

    return {"kl": kl, "jsd": jsd, "entropy": entropy, "token": token, "kl_grad": kl_grad}


def implementations(backends: list[str] | None = None, peers: bool = True) -> list[Impl]:
    """Every (implementation, op) that exists: numpy + logsumexp, scipy, torch (if
    importable), then each fastkl backend (default: all available)."""
    import fastkl

    groups: list[tuple[str, str, dict]] = []
    if peers:
        groups.append(("numpy logsumexp", "peer", _numpy_logsumexp()))
        groups.append(("scipy", "peer", _scipy()))
        torch = torch_module()
        if torch is not None:
            groups.append(("torch", "peer", _torch(torch)))
    for be in fastkl.available_backends() if backends is None else backends:
        groups.append((f"fastkl {be}", "fastkl", _fastkl(be)))
    return [Impl(name, op, fns[op], kind) for name, kind, fns in groups for op in OPS
            if op in fns]


# --------------------------------------------------------------------------- roofline


def roofline_impls() -> list[tuple[str, Callable[[LogitsCase], float]]]:
    """Streaming reads of ``a`` and ``b`` (the bytes the two-array ops must read)."""
    from registry import roofline_impls as mc_roofline

    class _Flat:  # the MC roofline functions read .logq and .logp
        def __init__(self, c):
            self.logq, self.logp = c.a.reshape(-1), c.b.reshape(-1)

    return [(name, (lambda c, fn=fn: fn(_Flat(c)))) for name, fn in mc_roofline()]


def roofline_reference(case: LogitsCase) -> float:
    return float(np.sum(case.a, dtype=np.float64) + np.sum(case.b, dtype=np.float64))
