"""Command line: ``fastkl demo`` (also ``python -m fastkl demo``) and ``fastkl backends``.

``fastkl demo`` reproduces J. Schulman's "Approximating KL Divergence" (2020) experiment:
x ~ q = N(0, 1), p = N(mu, 1) for mu = 0.1 and 1, and reports bias/true and stdev/true of
the k1, k2, k3 estimators of KL(q||p) and of reverse k3 for KL(p||q) beside their closed
forms, then one throughput line per available backend against the numpy textbook formula.

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

import argparse
import math
import os
import sys
import time

import numpy as np

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# (label, estimator, reverse, target)
_ESTIMATORS = (
    ("k1", "k1", False, "KL(q||p)"),
    ("k2", "k2", False, "KL(q||p)"),
    ("k3", "k3", False, "KL(q||p)"),
    ("reverse k3", "k3", True, "KL(p||q)"),
)

TEXTBOOK = "l = logp - logq; np.mean(np.exp(l) - 1 - l)"


def closed_form(label: str, mu: float) -> tuple[float, float]:
    """(bias/true, stdev/true) of an estimator for q = N(0,1), p = N(mu,1)."""
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
    for label, est, rev, target in _ESTIMATORS:
        st = fastkl.kl_mc_stats(logq, logp, est, reverse=rev, backend=stats_backend)
        bias = (st.mean - true) / true
        ci = 1.959963984540054 * st.sem / true
        cb, cs = closed_form(label, mu)
        lines.append(
            f"  {label:<11} {target:<9} | {bias:>+9.4f} {ci:>8.4f} {cb:>8.4f} | "
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
    exact = fastkl.kl_mc(logq, logp, "k3", backend="numpy")  # float64 reference value
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


def _parse_backends(spec: str | None) -> list[str]:
    import fastkl

    avail = fastkl.available_backends()
    if spec is None:
        return avail
    names = [s.strip() for s in spec.split(",") if s.strip()]
    from fastkl.backends import BACKEND_NAMES, get_backend

    for name in names:
        if name not in BACKEND_NAMES:
            raise SystemExit(f"fastkl demo: unknown backend {name!r} (choose from "
                             f"{', '.join(BACKEND_NAMES)})")
        get_backend(name)  # raises ValueError naming why it is unavailable
    return names


def cmd_demo(args) -> int:
    import fastkl

    n = int(args.samples)
    if n < 2:
        raise SystemExit("fastkl demo: --samples must be at least 2")
    try:
        backends = _parse_backends(args.backend)
    except ValueError as exc:
        raise SystemExit(f"fastkl demo: {exc}") from None
    if not backends:
        raise SystemExit("fastkl demo: no backend selected")
    out = sys.stdout
    t_start = time.perf_counter()

    # first calls before anything else touches a backend, so compile time is visible
    tiny = np.random.default_rng(12345).standard_normal((2, 1000)).astype(np.float32)
    first_calls = {}
    for name in backends:
        t0 = time.perf_counter()
        fastkl.kl_mc(tiny[0], tiny[1], "k3", backend=name)
        first_calls[name] = time.perf_counter() - t0

    stats_backend = backends[0]
    print(f"fastkl {fastkl.__version__} demo: J. Schulman, \"Approximating KL Divergence\" "
          "(2020)", file=out)
    print(f"x ~ q = N(0,1), p = N(mu,1); {n:,} samples per mu, seed {args.seed}; "
          f"kl_mc_stats(backend={stats_backend!r}) on float64 log-densities", file=out)
    print("k1 = -l, k2 = l^2/2, k3 = (r-1) - l estimate KL(q||p); reverse k3 = r*l - (r-1) "
          "estimates KL(p||q); l = logp - logq, r = e^l", file=out)
    print("bias/true = (mean - true)/true with its 95% interval; closed = exact value for "
          "these Gaussians", file=out)
    rng = np.random.default_rng(args.seed)
    data = None
    for mu in (0.1, 1.0):
        print(file=out)
        lines, data = _table(mu, n, stats_backend, rng)
        print("\n".join(lines), file=out)
    out.flush()
    if not args.no_bench:
        print(file=out)
        warn = load_warning()
        if warn:
            print(warn, file=out)
        print("\n".join(_throughput(data[0], data[1], backends, first_calls, args.repeats)),
              file=out)
    print(file=out)
    print(f"total {time.perf_counter() - t_start:.1f} s", file=out)
    return 0


def cmd_backends(args) -> int:
    import fastkl
    from fastkl.backends import _errors, _try_load

    avail = fastkl.available_backends()
    for name in ("cython", "numba", "numpy"):
        if name in avail:
            mod = _try_load(name)
            print(f"{name:<7} available   ({mod.__name__})")
        else:
            print(f"{name:<7} unavailable ({_errors.get(name, 'unknown reason')})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import fastkl

    parser = argparse.ArgumentParser(
        prog="fastkl",
        description="fastkl: fast, accurate KL divergence Monte Carlo estimators.",
    )
    parser.add_argument("--version", action="version", version=f"fastkl {fastkl.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="reproduce Schulman's 'Approximating KL Divergence' table and time the backends",
        description="Reproduce Schulman's experiment (q = N(0,1), p = N(0.1,1) and N(1,1)): "
        "bias and stdev of k1, k2, k3 and reverse k3 beside their closed forms, then one "
        "throughput line per backend against the numpy textbook formula.",
    )
    demo.add_argument("--samples", type=float, default=1e7,
                      help="samples per mu (default: 1e7)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--backend", default=None,
                      help="backend(s) to use, comma-separated (default: all available; "
                      "the first one computes the table)")
    demo.add_argument("--repeats", type=int, default=5,
                      help="timed calls per implementation, best reported (default: 5)")
    demo.add_argument("--no-bench", action="store_true", help="skip the throughput lines")
    demo.set_defaults(func=cmd_demo)
    be = sub.add_parser("backends", help="list the backends and whether they work here")
    be.set_defaults(func=cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
