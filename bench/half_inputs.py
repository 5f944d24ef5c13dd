"""k3 mean over 16-bit log-probs read in place against float32 (issue 12, item 3).

    python bench/half_inputs.py [--n 5e7] [--reps 7] [--threads 2] [--json out.json]

Times ``fastkl.kl_mc(logq, logp, "k3")`` (reduction "mean") for float32, float16 and
bfloat16 (``ml_dtypes``, skipped without it) inputs of the same values, per compiled backend,
interleaved (one repetition of every case per round), and prints the median of each and
its ratio to the float32 time. Every result is first checked against the float32 path on
the widened values (equal bits expected: the same float32 lanes run)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import fastkl


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=float, default=5e7)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    n = int(args.n)
    rng = np.random.default_rng(0)
    q32 = rng.normal(-2.0, 1.0, n).astype(np.float32)
    p32 = (q32 + rng.normal(0.0, 0.3, n).astype(np.float32))
    cases = {}
    try:
        import ml_dtypes
    except ImportError:
        ml_dtypes = None
    halves = [("float16", np.float16)]
    if ml_dtypes is not None:
        halves.append(("bfloat16", ml_dtypes.bfloat16))
    # float32 reference arrays hold the widened 16-bit values, so every case is bit-comparable
    for name, dt in halves:
        qh, ph = q32.astype(dt), p32.astype(dt)
        cases[name] = (qh, ph, qh.astype(np.float32), ph.astype(np.float32))
    backends = [b for b in ("cython", "numba") if b in fastkl.available_backends()]
    fastkl.set_num_threads(args.threads)
    load = os.getloadavg()
    times: dict = {}
    for be in backends:
        for name, (qh, ph, qw, pw) in cases.items():
            ref = fastkl.kl_mc(qw, pw, "k3", backend=be)
            got = fastkl.kl_mc(qh, ph, "k3", backend=be)
            if got != ref:
                raise SystemExit(f"{be} {name}: {got!r} != float32 path {ref!r}")
    for _ in range(args.reps):
        for be in backends:
            for name, (qh, ph, qw, pw) in cases.items():
                for label, a, b in ((f"{name} as float32", qw, pw), (name, qh, ph)):
                    t0 = time.perf_counter()
                    fastkl.kl_mc(a, b, "k3", backend=be)
                    times.setdefault((be, label), []).append(time.perf_counter() - t0)
    print(f"k3 mean, n={n:.3g}, threads={args.threads}, load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = []
    for be in backends:
        for name in cases:
            base = statistics.median(times[(be, f"{name} as float32")])
            med = statistics.median(times[(be, name)])
            rows.append({"backend": be, "input": name, "float32_ms": base * 1e3,
                         "ms": med * 1e3, "ratio": med / base})
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "threads": args.threads, "reps": args.reps,
                       "load_avg": load[0], "rows": rows}, f, indent=1)


def table(rows: list[dict]) -> str:
    """Markdown: per backend and 16-bit format, the median time against float32 inputs of
    the same values (timed interleaved, in the same run)."""
    out = ["| backend | input | median ms | float32 (same values) ms | vs float32 |",
           "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['backend']} | {r['input']} | {r['ms']:.1f} | {r['float32_ms']:.1f} "
                   f"| {r['ratio']:.2f}x |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
