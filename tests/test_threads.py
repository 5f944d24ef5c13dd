"""The thread policy (issue 11 items 3, 4): ``fastkl.set_num_threads`` / ``get_num_threads`` /
``threads``, ``FASTKL_NUM_THREADS``, the same bits for 1, 2 and 3 threads through that API,
and unknown estimator codes rejected by every backend before any kernel runs.

The inputs are sized from the thresholds of ``fastkl.backends._threads`` so that they keep
crossing them (the threaded code paths run) if a threshold moves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gaps_util import BACKENDS, COMPILED

import fastkl
from fastkl.backends import _threads, get_backend
from fastkl.backends._contract import BLOCK, EST_CODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastkl.__file__)))

MC_MIN = max(_threads.CYTHON_MC_MIN, _threads.NUMBA_MIN)
LOGITS_MIN = max(_threads.CYTHON_LOGITS_MIN, _threads.NUMBA_MIN)


@pytest.fixture(autouse=True)
def _default_threads():
    """Every test starts and ends with the runtimes' defaults (nothing set)."""
    saved = _threads.requested()
    _threads._reset()
    yield
    _threads._restore(saved)


def _bits(*xs) -> bytes:
    return b"".join(np.ascontiguousarray(np.asarray(x, dtype=np.float64)).tobytes()
                    for x in xs)


def _results(backend: str) -> list[tuple[str, bytes]]:
    """Every op, on inputs above every threshold (several blocks per row, ragged tails)."""
    rng = np.random.default_rng(11)
    rows = 3
    n = MC_MIN // rows + BLOCK + 517
    assert rows * n >= MC_MIN and n > BLOCK
    q = rng.normal(0.0, 1.0, (rows, n))
    p = q + rng.normal(0.0, 0.8, q.shape)
    mask = rng.random(q.shape) < 0.8
    q32, p32 = q.astype(np.float32), p.astype(np.float32)
    out = []
    for (est, rev) in (("k1", False), ("k3", False), ("k3", True)):
        kw = dict(reverse=rev, backend=backend)
        out.append((f"kl_mc mean {est} {rev}", _bits(fastkl.kl_mc(q, p, est, **kw))))
        out.append((f"kl_mc mean mask {est} {rev}",
                    _bits(fastkl.kl_mc(q32, p32, est, mask=mask, **kw))))
        out.append((f"kl_mc sum {est} {rev}",
                    _bits(fastkl.kl_mc(q, p, est, reduction="sum", **kw))))
        out.append((f"kl_mc axis=1 {est} {rev}", _bits(fastkl.kl_mc(q, p, est, axis=1, **kw))))
        out.append((f"kl_mc none {est} {rev}",
                    _bits(fastkl.kl_mc(q, p, est, reduction="none", **kw))))
        st = fastkl.kl_mc_stats(q, p, est, mask=mask, **kw)
        out.append((f"kl_mc_stats {est} {rev}", _bits([st.mean, st.std, st.sem, st.n])))
        v, g = fastkl.kl_mc_grad(q32, p32, est, **kw)
        out.append((f"kl_mc_grad {est} {rev}", _bits(v, g)))
    lrows = 24
    V = LOGITS_MIN // lrows + 101
    assert lrows * V >= LOGITS_MIN
    a = rng.normal(0.0, 2.0, (lrows, V))
    b = a + rng.normal(0.0, 0.5, a.shape)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    tok = rng.integers(0, V, lrows)
    for x, y, dt in ((a, b, "f64"), (a32, b32, "f32")):
        out.append((f"kl_logits {dt}", _bits(
            fastkl.kl_logits(x, y, temperature=0.7, reduction="none", backend=backend))))
        out.append((f"jsd_logits {dt}", _bits(
            fastkl.jsd_logits(x, y, 0.3, reduction="none", backend=backend))))
        out.append((f"entropy_logits {dt}", _bits(
            fastkl.entropy_logits(x, reduction="none", backend=backend))))
        out.append((f"token_logprobs {dt}", _bits(
            fastkl.token_logprobs(y, tok, backend=backend))))
        v, g = fastkl.kl_logits_grad(x, y, backend=backend)
        out.append((f"kl_logits_grad {dt}", _bits(v, g)))
        kw = dict(wrt="both", reduction="none", backend=backend)
        out.append((f"kl_logits_grad both {dt}", _bits(*fastkl.kl_logits_grad(x, y, **kw))))
        out.append((f"jsd_logits_grad {dt}", _bits(*fastkl.jsd_logits_grad(x, y, 0.3, **kw))))
        out.append((f"entropy_logits_grad {dt}",
                    _bits(*fastkl.entropy_logits_grad(x, backend=backend))))
        out.append((f"token_logprobs_grad {dt}",
                    _bits(*fastkl.token_logprobs_grad(y, tok, backend=backend))))
    return out


@pytest.mark.parametrize("backend", COMPILED)
def test_same_bits_for_1_2_3_threads(backend, monkeypatch):
    asked: list[int] = []
    if backend == "numba":
        import numba

        real = numba.set_num_threads

        def spy(k):
            asked.append(k)
            real(k)

        monkeypatch.setattr(numba, "set_num_threads", spy)
    runs = {}
    for k in (1, 2, 3, 2):
        with fastkl.threads(k):
            assert fastkl.get_num_threads() == k
            if backend == "cython":
                from fastkl.backends.cython import _logits, _mc

                if _mc.openmp():
                    assert _mc.max_threads() == _logits.max_threads() == k
            runs.setdefault(k, []).append(_results(backend))
    if backend == "numba":  # the threaded launches asked numba's pool for 2 and 3 threads
        import numba

        for k in (2, 3):
            want = min(k, numba.config.NUMBA_NUM_THREADS)
            assert want == numba.get_num_threads() or want in asked, (k, asked)
    first = runs[1][0]
    for k, results in runs.items():
        for res in results:
            for (name, b0), (_, b1) in zip(first, res, strict=True):
                assert b0 == b1, f"{backend}: {name} differs between 1 and {k} threads"


# --------------------------------------------------------------------------- the API


def test_set_get_and_context_manager_restore():
    default = fastkl.get_num_threads()
    assert isinstance(default, int) and default >= 1
    fastkl.set_num_threads(3)
    assert fastkl.get_num_threads() == 3
    with fastkl.threads(1):
        assert fastkl.get_num_threads() == 1
        with fastkl.threads(2):
            assert fastkl.get_num_threads() == 2
        assert fastkl.get_num_threads() == 1
    assert fastkl.get_num_threads() == 3
    with pytest.raises(KeyError), fastkl.threads(2):
        assert fastkl.get_num_threads() == 2
        raise KeyError("boom")
    assert fastkl.get_num_threads() == 3
    _threads._reset()
    with fastkl.threads(2):
        pass
    assert _threads.requested() is None  # back to the runtimes' defaults, not a number
    assert fastkl.get_num_threads() == default
    fastkl.set_num_threads(np.int64(2))  # any integer type
    assert fastkl.get_num_threads() == 2


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                     ("2", TypeError), (None, TypeError), (True, TypeError)])
def test_invalid_counts(bad, exc):
    fastkl.set_num_threads(2)
    with pytest.raises(exc, match=r"\bn\b"):
        fastkl.set_num_threads(bad)
    with pytest.raises(exc, match=r"\bn\b"), fastkl.threads(bad):
        pass  # pragma: no cover
    assert fastkl.get_num_threads() == 2  # unchanged


def test_exported():
    for name in ("set_num_threads", "get_num_threads", "threads"):
        assert name in fastkl.__all__ and callable(getattr(fastkl, name))


def _run_py(code: str, env: dict) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=300)


ENV_CODE = """
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import fastkl
    from fastkl.backends import _threads
    import numpy as np
    x = np.random.default_rng(0).normal(size=(4, 9000))
    v = fastkl.kl_logits(x, x + 0.1, backend="numpy")
mine = [str(m.message) for m in w if "FASTKL_NUM_THREADS" in str(m.message)]
print(_threads.requested(), fastkl.get_num_threads(), len(mine), mine[0] if mine else "")
"""


def test_env_var_sets_the_count():
    out = _run_py(ENV_CODE, {"FASTKL_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["2", "2", "0"]


@pytest.mark.parametrize("raw", ["zero", "0", "-3", "2.5"])
def test_bad_env_var_is_one_warning(raw):
    out = _run_py(ENV_CODE, {"FASTKL_NUM_THREADS": raw})
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[0] == "None" and int(words[1]) >= 1 and words[2] == "1", out.stdout
    assert repr(raw) in out.stdout


FORK_CODE = """
import os, sys
import numpy as np
import fastkl

be = sys.argv[1]
rng = np.random.default_rng(1)
q = rng.normal(size=(8, 20000))
p = q + 0.3 * rng.normal(size=q.shape)
fastkl.set_num_threads(2)
parent = fastkl.kl_mc(q, p, "k3", reduction="none", backend=be).tobytes()
pid = os.fork()
if pid == 0:
    ok = (fastkl.get_num_threads() == 1
          and fastkl.kl_mc(q, p, "k3", reduction="none", backend=be).tobytes() == parent)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""


@pytest.mark.parametrize("backend", COMPILED)
def test_forked_child_stays_serial(backend):
    full = dict(os.environ)
    full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK_CODE), backend], env=full,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------- estimator codes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code", [99, -1, max(EST_CODES.values()) + 1])
def test_unknown_estimator_code_raises(backend, code):
    mod = get_backend(backend)
    q = np.zeros((2, 10))
    inf = float("inf")
    clamp = (-inf, inf, -inf, inf, 0.0)
    with pytest.raises(ValueError, match="estimator code"):
        mod.mc_partials(q, q, None, None, code, clamp, True)
    out = np.full(q.shape, 7.0)
    with pytest.raises(ValueError, match="estimator code"):
        mod.mc_terms(q, q, None, None, code, clamp, out)
    assert (out == 7.0).all()  # raised before any kernel ran
    with pytest.raises(ValueError, match="estimator code"):
        mod.mc_grad(q, q, None, None, code, clamp, 0, np.ones(2), out)
    assert (out == 7.0).all()
