"""``fastkl warmup``: after it, a new process runs every kernel family without compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fastkl
from fastkl.cli import main
from fastkl.warmup import warmup

# A workload unlike warmup's own inputs in shape and values (same dtypes and layouts): every
# kernel family, MC and logits, small and large, float32 and float64. It prints how many
# numba compilations it triggered (loads from the on-disk cache are not compilations).
_WORKLOAD = r"""
import json, sys
import numpy as np
from numba.core import event
import fastkl

dts = sys.argv[1].split(",")
rng = np.random.default_rng(5)
with event.install_recorder("numba:compile") as rec:
    for dt in dts:
        for rows, cols in ((3, 100), (16, 5000)):
            q = rng.normal(-1.0, 1.0, size=(rows, cols)).astype(dt)
            p = (q + rng.normal(0.0, 0.2, size=q.shape)).astype(dt)
            m = rng.random(q.shape) < 0.8
            be = "numba"
            fastkl.kl_mc(q, p, "k1", backend=be)
            fastkl.kl_mc(q, p, "k3", reverse=True, reduction="none", backend=be)
            fastkl.kl_mc(q, p, mask=m, reduction="seq-mean-token-sum", backend=be)
            fastkl.kl_mc(q, p, mask=m, reduction="token-mean", clamp_log_ratio=(-5, 5),
                         clamp_value=(-3, 3), backend=be)
            fastkl.kl_mc_stats(q, p, "k2", mask=m, backend=be)
            fastkl.kl_mc_grad(q, p, "k3", backend=be)
        for rows, vocab in ((3, 300), (3, 40000)):
            a = rng.normal(size=(rows, vocab)).astype(dt)
            b = (a + rng.normal(size=a.shape)).astype(dt)
            fastkl.kl_logits(a, b, reduction="mean", backend="numba")
            fastkl.jsd_logits(a, b, beta=0.3, backend="numba")
            fastkl.entropy_logits(b, temperature=0.7, backend="numba")
            fastkl.token_logprobs(a, rng.integers(0, vocab, size=rows), backend="numba")
            fastkl.kl_logits_grad(a, b, reduction="sum", backend="numba")
            fastkl.jsd_logits_grad(a, b, 0.3, wrt="both", backend="numba")
            fastkl.entropy_logits_grad(a, backend="numba")
            fastkl.token_logprobs_grad(a, rng.integers(0, vocab, size=rows), backend="numba")
print(json.dumps(len(rec.buffer)))
"""


def _run(args: list[str], timeout: float) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       timeout=timeout, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.skipif("numba" not in fastkl.available_backends(), reason="numba not available")
def test_after_warmup_a_new_process_compiles_nothing():
    from fastkl.backends.numba import cache as _numba_cache

    if _numba_cache.cache_dir() is None:
        pytest.skip("no writable numba cache directory here (or FASTKL_NUMBA_CACHE=0)")
    # the same cache directory as this test session's (warm by now unless numba ran nowhere
    # yet: then this compiles for a minute or two, which is what warmup is for)
    out = _run(["-m", "fastkl", "warmup", "--backend", "numba", "--no-progress"], 900)
    assert "numba float32" in out and "numba float64" in out
    assert json.loads(_run(["-c", _WORKLOAD, "float32,float64"], 600)) == 0


def test_warmup_refuses_bad_arguments():
    with pytest.raises(ValueError, match="dtypes"):
        warmup(["int32"])
    with pytest.raises(ValueError, match="dtypes"):
        warmup(["no-such-dtype"])
    with pytest.raises(ValueError, match="backends"):
        warmup(["float32"], ["nonexistent"])


def test_warmup_cli_reports_each_backend_and_dtype(capsys):
    assert main(["warmup", "--backend", "numpy", "--dtypes", "float64", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["numpy", "float64"] and out[-1].startswith("warm:")
    assert main(["warmup", "--dtypes", "int8", "--no-progress"]) == 1
    assert "error: dtypes" in capsys.readouterr().err
