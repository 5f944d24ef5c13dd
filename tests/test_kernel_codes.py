"""The compiled kernels' codes against the Python tables (issue 11).

The C headers name the estimator codes and the logits ops in enums (``mc.h``, ``logits.h``);
the extensions expose them (``_mc.EST_CODES``, ``_logits.LOGITS_OPS``). A drift between
those enums and ``fastkl._estimators`` / ``_contract.LOGITS_OPS`` fails here, and a code the
kernels do not know raises instead of computing some other estimator or op.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastkl._estimators import ESTIMATORS
from fastkl.backends._contract import LOGITS_OPS

cy = pytest.importorskip("fastkl.backends.cython", reason="the Cython backend is not built")
from fastkl.backends.cython import _logits, _mc  # noqa: E402

UNKNOWN = (99, -1, len(ESTIMATORS))


def test_cython_estimator_codes_match_the_table():
    assert _mc.EST_CODES == {e.label: e.code for e in ESTIMATORS}


def test_cython_logits_ops_match_the_contract():
    assert _logits.LOGITS_OPS == LOGITS_OPS
    # the backend's own ops come after the contract's
    assert {_logits.OP_TOKEN, _logits.OP_GRAD} == {len(LOGITS_OPS), len(LOGITS_OPS) + 1}


def _pair(dtype=np.float64):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 50)).astype(dtype)
    return q, (q + rng.normal(size=q.shape)).astype(dtype)


NOCLAMP = (-np.inf, np.inf, -np.inf, np.inf, 0.0)  # the kernels' clamp tuple: no clamp


@pytest.mark.parametrize("code", UNKNOWN)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cython_unknown_estimator_code_raises(code, dtype):
    q, p = _pair(dtype)
    with pytest.raises(ValueError, match="estimator code"):
        cy.mc_partials(q, p, None, None, code, NOCLAMP, True)
    out = np.full(q.shape, 7.0, dtype=dtype)
    with pytest.raises(ValueError, match="estimator code"):
        cy.mc_terms(q, p, None, None, code, NOCLAMP, out)
    assert (out == 7.0).all()  # the kernel did not run
    with pytest.raises(ValueError, match="estimator code"):
        cy.mc_grad(q, p, None, None, code, NOCLAMP, 0, np.ones(2), np.empty_like(q))


@pytest.mark.parametrize("code", [e.code for e in ESTIMATORS])
def test_cython_known_estimator_codes_run(code):
    q, p = _pair()
    part = cy.mc_partials(q, p, None, None, code, NOCLAMP, True)
    assert np.isfinite(part).all()


@pytest.mark.parametrize("op", [99, -1, 5])
def test_cython_unknown_logits_op_raises(op):
    a, b = _pair()
    out = np.full(a.shape[0], 7.0)
    with pytest.raises(ValueError, match="logits op code"):
        _logits.run(op, a, b, 1.0, 0.5, False, None, None, 0, None, out, None)
    assert (out == 7.0).all()


@pytest.mark.parametrize("gop", [99, -1, 4])
def test_cython_unknown_differentiated_op_raises(gop):
    """The gradient kernel runs only for the ops it knows (KL, JSD, entropy, token): another
    code raises before anything is written."""
    a, b = _pair()
    out = np.full(a.shape[0], 7.0)
    grad = np.full(a.shape, 7.0)
    with pytest.raises(ValueError, match="logits op code"):
        _logits.run(_logits.OP_GRAD, a, b, 1.0, 0.5, False, None, None, 0, np.ones(2), out,
                    grad, grad, gop)
    assert (out == 7.0).all() and (grad == 7.0).all()
