"""The ``numpy`` backend against the specification (``backend="reference"``) and the numpy
textbook formulas, interleaved in one run (issue 12, item 6; docs/kernel_math.md).

    python bench/numpy_backend.py [--sizes 1e4,1e5,5e7] [--estimators k3,k1,k2] [--no-reference]

Inputs: the demo's Gaussian pair (q = N(0, 1), p = N(0.5, 1) log-densities at x ~ q) in
float32; each timing is the best of ``--repeats`` rounds, one call of each implementation
per round. Prints the load average: the figures are only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import fastkl

TEXTBOOK = {
    "k3": lambda q, p: float(np.mean(np.exp(p - q) - 1 - (p - q))),
    "k1": lambda q, p: float(np.mean(-(p - q))),
    "k2": lambda q, p: float(np.mean(0.5 * (p - q) ** 2)),
}


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e4,1e5,5e7")
    ap.add_argument("--estimators", default="k3,k1,k2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'op':<14} {'reference':>12} {'numpy':>10} {'textbook':>10} {'textbook/numpy':>15}")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        x = rng.standard_normal(n)
        q = (-0.5 * x * x).astype(np.float32)
        p = (-0.5 * (x - 0.5) ** 2).astype(np.float32)
        for est in args.estimators.split(","):
            impls = {"textbook": lambda est=est, q=q, p=p: TEXTBOOK[est](q, p),
                     "numpy": lambda est=est, q=q, p=p: fastkl.kl_mc(q, p, est,
                                                                     backend="numpy")}
            if not args.no_reference:
                impls["reference"] = lambda est=est, q=q, p=p: fastkl.kl_mc(
                    q, p, est, backend="reference")
            best = dict.fromkeys(impls, np.inf)
            for _ in range(args.repeats if n <= 10**6 else max(2, args.repeats // 2)):
                for name, fn in impls.items():
                    best[name] = min(best[name], _once(fn))
            ref = f"{best.get('reference', np.nan) * 1e3:9.2f} ms"
            print(f"{est} mean {n:.0e} {ref:>12} {best['numpy'] * 1e3:7.2f} ms "
                  f"{best['textbook'] * 1e3:7.2f} ms {best['textbook'] / best['numpy']:14.2f}x",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
