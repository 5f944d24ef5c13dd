"""Call overhead at small sizes (issue 12 item 5: "no size where fastkl loses to numpy"):
``fastkl.kl_mc`` with the default backend (and numba) against the numpy textbook formula, at
1e3, 1e4 and 1e5 pairs, k1 / k2 / k3 means and k3 sum, float32 and float64, plus
``kl_mc_stats`` and ``reduction="none"``. Every timing is the minimum over many interleaved
rounds (each round times every case once, so a burst of load hits all of them alike).

    python bench/small_sizes.py                          # this checkout
    python bench/small_sizes.py --before /path/to/other  # both, alternating processes

With ``--before`` the script runs itself alternately on the other checkout and on this one
(``PYTHONPATH``), ``--rounds`` times each, and prints one table: before, after, numpy, ratio
(numpy / after: > 1 means fastkl is faster). Prints the load average at start and end.
``--sizes 1e5`` times some sizes only; ``FASTKL_NUM_THREADS=1`` in the environment times the
serial kernels (numpy's formula is serial too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit

import numpy as np

SIZES = [1000, 10_000, 100_000]
DTYPES = ["float32", "float64"]
CASES = [("k1", "mean"), ("k2", "mean"), ("k3", "mean"), ("k3", "sum"), ("k3", "stats"),
         ("k3", "none")]


def _textbook(est, red, q, p):
    if est == "k1":
        return lambda: np.mean(-(p - q))
    if est == "k2":
        return lambda: np.mean((p - q) ** 2 / 2)
    if red == "sum":
        return lambda: np.sum(np.exp(p - q) - 1 - (p - q))
    if red == "none":
        return lambda: np.exp(p - q) - 1 - (p - q)
    return lambda: np.mean(np.exp(p - q) - 1 - (p - q))


def _fastkl(fastkl, est, red, q, p, backend):
    if red == "stats":
        return lambda: fastkl.kl_mc_stats(q, p, est, backend=backend)
    return lambda: fastkl.kl_mc(q, p, est, reduction=red, backend=backend)


def measure(rounds: int, backends: list[str], sizes: list[int]) -> dict:
    """{key: best seconds per call} for every case, minimum over ``rounds`` interleaved
    rounds of a few calls each."""
    import fastkl

    rng = np.random.default_rng(0)
    funcs = {}
    for n in sizes:
        for dt in DTYPES:
            q = rng.normal(-5, 1, n).astype(dt)
            p = (q + rng.normal(0, 0.3, n)).astype(dt)
            for est, red in CASES:
                base = f"{n}|{dt}|{est}|{red}"
                funcs[f"{base}|numpy"] = _textbook(est, red, q, p)
                for be in backends:
                    funcs[f"{base}|{be}"] = _fastkl(fastkl, est, red, q, p, be)
    best = dict.fromkeys(funcs, float("inf"))
    for f in funcs.values():  # JIT, first-touch
        f()
    for _ in range(rounds):
        for key, f in funcs.items():
            n = int(key.split("|")[0])
            number = max(1, 20_000 // n)
            t = timeit.timeit(f, number=number) / number
            best[key] = min(best[key], t)
    return best


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--before", help="another checkout (its root) to time alternately")
    ap.add_argument("--alternations", type=int, default=4)
    ap.add_argument("--backends", default="default,numba")
    ap.add_argument("--sizes", default=",".join(str(n) for n in SIZES))
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    backends = [None if b == "default" else b for b in args.backends.split(",")]
    if args.json:
        res = measure(args.rounds, backends, [int(float(x)) for x in args.sizes.split(",")])
        print(json.dumps({k.replace("|None", "|default"): v for k, v in res.items()}))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"after": here} if not args.before else {"before": args.before, "after": here}
    print(f"load average at start: {_load()}")
    best: dict[str, dict] = {k: {} for k in roots}
    for _ in range(args.alternations if args.before else 1):
        for label, root in roots.items():
            env = dict(os.environ, PYTHONPATH=root)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json",
                                  "--rounds", str(args.rounds), "--backends", args.backends,
                                  "--sizes", args.sizes],
                                 env=env, capture_output=True, text=True, check=True).stdout
            for k, v in json.loads(out).items():
                best[label][k] = min(best[label].get(k, float("inf")), v)
    print(f"load average at end: {_load()}")
    cols = "| pairs | dtype | est | reduction | backend | " + (
        "before us | " if args.before else "") + "after us | numpy us | numpy/after |"
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for key in best["after"]:
        n, dt, est, red, be = key.split("|")
        if be == "numpy":
            continue
        ref = min(best[lab][f"{n}|{dt}|{est}|{red}|numpy"] for lab in roots)
        after = best["after"][key]
        before = f"{best['before'].get(key, float('nan')) * 1e6:.1f} | " if args.before else ""
        print(f"| {int(n):.0e} | {dt} | {est} | {red} | {be} | {before}{after * 1e6:.1f} | "
              f"{ref * 1e6:.1f} | {ref / after:.2f} |")


if __name__ == "__main__":
    main()
