"""The built-in demo (``fastkl demo``, also ``fastkl`` with no files).

It reproduces J. Schulman's "Approximating KL Divergence" (2020) experiment: x ~ q = N(0, 1),
p = N(mu, 1) for mu = 0.1 and 1, and reports bias/true and stdev/true of the k1, k2, k3
estimators of KL(q||p) and of reverse k3 for KL(p||q) beside their closed forms, then one
throughput line per available backend against the numpy textbook formula.

Closed forms (unit-variance Gaussians, l = log p(x) - log q(x) = mu*x - mu**2/2 with
x ~ N(0, 1), so l ~ N(-mu**2/2, mu**2) and KL(q||p) = KL(p||q) = mu**2/2):

* k1 = -l: unbiased, sd = mu, so sd/true = 2/mu.
* k2 = l**2/2: E = mu**2/2 + mu**4/8, so bias/true = mu**2/4; sd/true = sqrt(2 + mu**2).
* k3 = (r - 1) - l: unbiased, sd/true = 2 sqrt(e^{mu^2} - 1 - mu^2) / mu**2.
* reverse k3 = r*l - (r - 1) = r(l - 1) + 1: unbiased, since E_q[r g(l)] = E_p[g(l)] and
  E_p[l] = KL(p||q). For the second moment, e^{2l} tilts N(m, s^2) (m = -s^2/2, s^2 = mu^2)
  to N(m + 2 s^2, s^2) = N(3 mu^2/2, mu^2) with factor e^{2m + 2s^2} = e^{mu^2}:
  E_q[t^2] = e^{mu^2} ((3 mu^2/2 - 1)^2 + mu^2) + 2 (mu^2/2 - 1) + 1, so
  Var = e^{mu^2} ((3 mu^2/2 - 1)^2 + mu^2) + mu^2 - 1 - mu^4/4  (-> mu^4/2 as mu -> 0, the
  same sqrt(2) as k3). Without cancellation: Var = (e^{mu^2} - 1 - mu^2) a + 9 mu^6/4,
  a = 1 - 2 mu^2 + 9 mu^4/4 > 0.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from ._core import Z95
from ._estimators import BY_LABEL, Estimator

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# the table's rows: Schulman's three estimators of KL(q||p) and reverse k3 (estimator table
# labels; closed_form below has a formula for each)
_ROWS: tuple[Estimator, ...] = tuple(BY_LABEL[label] for label in ("k1", "k2", "k3", "rk3"))

TEXTBOOK = "l = logp - logq; np.mean(np.exp(l) - 1 - l)"


def row_label(est: Estimator) -> str:
    """The demo's name of an estimator: ``k3``, ``reverse k3``."""
    return f"reverse {est.name}" if est.reverse else est.name


def closed_form(label: str, mu: float) -> tuple[float, float]:
    """(bias/true, stdev/true) of an estimator (``row_label``) for q = N(0,1), p = N(mu,1)."""
    m2 = mu * mu
    true = m2 / 2.0
    if label == "k1":
        return 0.0, 2.0 / mu
    if label == "k2":
        return m2 / 4.0, math.sqrt(2.0 + m2)
    if label == "k3":
        # expm1(m2) - m2 without cancellation for small mu
        return 0.0, 2.0 * math.sqrt(_expm1_minus_x(m2)) / m2
    if label == "reverse k3":
        # Var = e^{m2} a + m2 - 1 - m2^2/4 with a = (3 m2/2 - 1)^2 + m2 = 1 - 2 m2 + 9 m2^2/4
        # (a > 0 always); with e^{m2} = 1 + m2 + E(m2), E(x) = e^x - 1 - x, this is
        # Var = E(m2) a + 9 m2^3 / 4: a sum of positive terms, no cancellation
        a = 1.0 - 2.0 * m2 + 2.25 * m2 * m2
        var = _expm1_minus_x(m2) * a + 2.25 * m2**3
        return 0.0, math.sqrt(var) / true
    raise ValueError(label)


def _expm1_minus_x(x: float) -> float:
    if abs(x) < 1e-2:
        return x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return math.expm1(x) - x


def gaussian_samples(mu: float, n: int, rng: np.random.Generator):
    """x ~ N(0,1); (log q(x), log p(x)) as float64 for q = N(0,1), p = N(mu,1)."""
    x = rng.standard_normal(n)
    logq = -0.5 * x * x - _LOG_SQRT_2PI
    d = x - mu
    logp = -0.5 * d * d - _LOG_SQRT_2PI
    return logq, logp


def _best_time(fn, repeats: int, budget_s: float = 2.0):
    """Best wall time of up to ``repeats`` calls (at least 2), stopping once ``budget_s`` is
    spent; returns (best seconds, last result)."""
    best, spent, res = math.inf, 0.0, None
    for i in range(max(repeats, 2)):
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if i >= 1 and spent > budget_s:
            break
    return best, res


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:9.1f} ms" if s < 10 else f"{s:9.2f} s "


def _textbook_k3(logq, logp):
    l = logp - logq
    return float(np.mean(np.exp(l) - 1 - l))


def _table(mu: float, n: int, stats_backend: str | None, rng):
    import fastkl

    true = mu * mu / 2.0
    logq, logp = gaussian_samples(mu, n, rng)
    lines = [
        f"mu = {mu:g}    true KL(q||p) = KL(p||q) = mu^2/2 = {true:g}",
        f"  {'estimator':<11} {'estimates':<9} | {'bias/true':>9} {'± 95%':>8} "
        f"{'closed':>8} | {'stdev/true':>10} {'closed':>8}",
        "  " + "-" * 11 + " " + "-" * 9 + "-+-" + "-" * 27 + "-+-" + "-" * 19,
    ]
    for est in _ROWS:
        label = row_label(est)
        st = fastkl.kl_mc_stats(logq, logp, est.name, reverse=est.reverse,
                                backend=stats_backend)
        bias = (st.mean - true) / true
        ci = Z95 * st.sem / true
        cb, cs = closed_form(label, mu)
        lines.append(
            f"  {label:<11} {est.target:<9} | {bias:>+9.4f} {ci:>8.4f} {cb:>8.4f} | "
            f"{st.std / true:>10.4f} {cs:>8.4f}"
        )
    return lines, (logq, logp)


def _throughput(logq64, logp64, backends, first_calls, repeats) -> list[str]:
    import fastkl

    logq = logq64.astype(np.float32)
    logp = logp64.astype(np.float32)
    n = logq.size
    nbytes = logq.nbytes + logp.nbytes
    t_np, ref = _best_time(lambda: _textbook_k3(logq, logp), repeats)
    exact = fastkl.kl_mc(logq, logp, "k3", backend="reference")  # float64 spec value
    lines = [
        f"Throughput: kl_mc(logq, logp, \"k3\") over {n:,} float32 pairs "
        f"({nbytes / 1e6:.0f} MB of input), best of up to {max(repeats, 2)} calls",
        f"  {'implementation':<16} {'first call':>12} {'best':>12} {'GB/s':>7} "
        f"{'vs numpy':>9}  {'rel. err of mean':>16}",
        f"  {'numpy textbook':<16} {'':>12} {_fmt_ms(t_np):>12} "
        f"{nbytes / t_np / 1e9:>7.2f} {1.0:>8.2f}x  {abs(ref - exact) / exact:>16.1e}",
    ]
    for name in backends:
        t, val = _best_time(
            lambda name=name: fastkl.kl_mc(logq, logp, "k3", backend=name), repeats
        )
        lines.append(
            f"  {'fastkl ' + name:<16} {_fmt_ms(first_calls[name]):>12} {_fmt_ms(t):>12} "
            f"{nbytes / t / 1e9:>7.2f} {t_np / t:>8.2f}x  {abs(val - exact) / exact:>16.1e}"
        )
    lines.append(f"  numpy textbook = {TEXTBOOK} (float32)")
    lines.append(
        "  first call = the first kl_mc call in this process (1,000 pairs, float32): JIT "
        "compile / extension load"
    )
    return lines


def load_warning() -> str | None:
    """A line to print when the machine is busy (timings of threaded kernels then measure the
    scheduler more than the kernel), else None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (f"warning: load average {load:.1f} on {cores} cores: other processes compete "
                "for the CPU, so the timings (of multi-threaded kernels above all) are noisy")
    return None


def _first_calls(backends: list[str]) -> dict[str, float]:
    """Seconds of each backend's first kl_mc call (1,000 float32 pairs): run before anything
    else touches a backend, so JIT compile / extension load time is visible."""
    import fastkl

    tiny = np.random.default_rng(12345).standard_normal((2, 1000)).astype(np.float32)
    first_calls = {}
    for name in backends:
        t0 = time.perf_counter()
        fastkl.kl_mc(tiny[0], tiny[1], "k3", backend=name)
        first_calls[name] = time.perf_counter() - t0
    return first_calls


def run(n: int, seed: int, backends: list[str], repeats: int, bench: bool) -> int:
    """Print the demo on stdout: the table for mu = 0.1 and 1 from ``n`` samples each (computed
    by ``backends[0]``), then, with ``bench``, one throughput line per backend."""
    import fastkl

    out = sys.stdout
    t_start = time.perf_counter()
    first_calls = _first_calls(backends)

    stats_backend = backends[0]
    print(f"fastkl {fastkl.__version__} demo: J. Schulman, \"Approximating KL Divergence\" "
          "(2020)", file=out)
    print(f"x ~ q = N(0,1), p = N(mu,1); {n:,} samples per mu, seed {seed}; "
          f"kl_mc_stats(backend={stats_backend!r}) on float64 log-densities", file=out)
    print("k1 = -l, k2 = l^2/2, k3 = (r-1) - l estimate KL(q||p); reverse k3 = r*l - (r-1) "
          "estimates KL(p||q); l = logp - logq, r = e^l", file=out)
    print("bias/true = (mean - true)/true with its 95% interval; closed = exact value for "
          "these Gaussians", file=out)
    rng = np.random.default_rng(seed)
    data = None
    for mu in (0.1, 1.0):
        print(file=out)
        lines, data = _table(mu, n, stats_backend, rng)
        print("\n".join(lines), file=out)
    out.flush()
    if bench:
        print(file=out)
        warn = load_warning()
        if warn:
            print(warn, file=out)
        print("\n".join(_throughput(data[0], data[1], backends, first_calls, repeats)),
              file=out)
    print(file=out)
    print(f"total {time.perf_counter() - t_start:.1f} s", file=out)
    return 0
