"""Every backend x estimator x reduction x generator case against the numpy reference.

Both raise (same exception type and message) or neither; values agree within
``1e-6 * max(1, |log r|)`` relative for float32 results and ``1e-12 * max(1, |log r|)`` for
float64 results (reductions: the same relative bound on sum |w t| max(1, |log r|), which is
what a per-term error of that size can move a sum or mean by); NaN and +-inf positions equal;
result types equal (Python float for full reductions, same dtype for arrays); inputs never
modified (values, dtype, strides, writeable flag).
"""

from __future__ import annotations

import arrays
import numpy as np
import pytest

import fastkl

CASES = arrays.case_names()

_TIGHT_CLAMP = {"clamp_log_ratio": (-2.0, 1.0), "clamp_value": (-0.5, 3.0)}
_VERL_CLAMP = {"clamp_log_ratio": (-20.0, 20.0), "clamp_value": (-10.0, 10.0)}


def _options(case: arrays.Case) -> list[dict]:
    opts = [{}, _TIGHT_CLAMP]
    if "wide" in case.name:
        opts.append(_VERL_CLAMP)
    return opts


def _policies(case: arrays.Case) -> list[str]:
    if "nan" in case.name or "inf" in case.name:
        return ["propagate", "omit", "raise"]
    return ["propagate"]


def _call(backend, case, est, kw):
    estimator, reverse = est
    try:
        return fastkl.kl_mc(case.logq, case.logp, estimator, reverse=reverse, backend=backend,
                            **case.kwargs(), **kw), None
    except Exception as exc:  # noqa: BLE001 - compared with the reference's behaviour
        return None, exc


def _reduce_bound(red: dict, A: np.ndarray, W: np.ndarray, ndim: int) -> np.ndarray:
    """Upper bound of |backend - reference| for a reduction, from per-term bounds A (already
    multiplied by the weights) and the included weights W."""
    how = red["reduction"]
    if how == "token-mean":
        return np.asarray(A.sum() / W.sum())
    if how in ("seq-mean-token-mean", "seq-mean-token-sum"):
        Wr = W.sum(axis=1)
        Ar = A.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per = Ar / Wr if how == "seq-mean-token-mean" else Ar
        has = Wr > 0
        return np.asarray(per[has].mean() if has.any() else 0.0)
    axis = red.get("axis")
    if isinstance(axis, int):
        axis = (axis,)
    if axis is not None:
        axis = tuple(a % ndim for a in axis)
    s = np.sum(A, axis=axis)
    if how == "sum":
        return s
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / np.sum(W, axis=axis)


def _as_f64(case: arrays.Case) -> arrays.Case:
    try:
        q = np.asarray(case.logq, dtype=np.float64)
        p = np.asarray(case.logp, dtype=np.float64)
    except (TypeError, ValueError):
        return case
    iw = None if case.log_iw is None else np.asarray(case.log_iw, dtype=np.float64)
    return arrays.Case(case.name, q, p, case.mask, iw)


def _weights(case: arrays.Case) -> np.ndarray:
    shape = np.shape(case.logq)
    if case.mask is None:
        return np.ones(shape)
    return np.asarray(case.mask, dtype=np.float64)


@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
@pytest.mark.parametrize("name", CASES)
def test_backend_matches_reference(backend, cases, name, est):
    case = cases(name)
    ndim = case.ndim
    checked = 0
    for opt in _options(case):
        # float64 reference terms (the float32 "none" output may overflow where a float64
        # reduction does not): the tolerance of a reduction is built from them
        ref_terms, ref_exc = _call("reference", _as_f64(case), est, {"reduction": "none", **opt})
        for policy in _policies(case):
            for red in arrays.reductions_for(np.shape(case.logq)):
                kw = {**red, **opt, "nan_policy": policy}
                what = f"{backend} {name} {est} {kw}"
                snap = arrays.snapshot(case.logq, case.logp, case.mask, case.log_iw)
                got, exc = _call(backend, case, est, kw)
                arrays.assert_unchanged(snap)
                ref, rexc = _call("reference", case, est, kw)
                if rexc is not None or exc is not None:
                    assert rexc is not None, f"{what}: backend raised {exc!r}, reference did not"
                    assert exc is not None, f"{what}: reference raised {rexc!r}, backend did not"
                    assert type(exc) is type(rexc) and str(exc) == str(rexc), (
                        f"{what}: backend raised {exc!r}, reference {rexc!r}")
                    checked += 1
                    continue
                assert type(got) is type(ref), f"{what}: type {type(got)} != {type(ref)}"
                assert ref_exc is None
                out_dtype = arrays.result_dtype(case.logq, case.logp)
                rtol = arrays.EQUIV_RTOL[out_dtype]
                scale = arrays.term_scale(case.logq, case.logp, case.log_iw)
                tiny = np.finfo(out_dtype).tiny
                if red["reduction"] == "none":
                    assert np.asarray(got).dtype == np.asarray(ref).dtype, what
                    with np.errstate(invalid="ignore"):
                        bound = rtol * scale * np.abs(np.asarray(ref, dtype=np.float64)) + tiny
                    arrays.assert_within(got, ref, bound, what)
                else:
                    t = np.asarray(ref_terms, dtype=np.float64)
                    with np.errstate(invalid="ignore"):
                        A = np.where(np.isfinite(t), np.abs(t) * scale, 0.0)
                    W = _weights(case) * ~np.isnan(t)
                    bound = rtol * _reduce_bound(red, A, W, ndim) + 1e-300
                    if isinstance(ref, np.ndarray):
                        assert got.dtype == ref.dtype == np.float64, what
                    arrays.assert_within(got, ref, bound, what)
                checked += 1
    assert checked > 0
