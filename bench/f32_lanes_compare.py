"""float32 lanes before / after, side by side in one process (issue 12).

    PYTHONPATH=. python bench/f32_lanes_compare.py [--rounds 9] [--big 5e7] [--json out.json]

Every fastkl candidate is timed with its backend's float32 lanes off ("before": the float64
lanes, numba ``mc.F32_LANES = False``, Cython ``_mc.set_f32_lanes(False)``) and on
("after"), interleaved: each round times every candidate once, and the table gives the
minimum over rounds. Rows:

* in cache, 1 thread, 1e6 float32 pairs: process CPU time per element, against numpy's
  ``np.exp(logp, out=buf)`` alone (no allocation) and the textbook
  ``np.mean(np.exp(l) - 1 - l)`` (``l = logp - logq`` in float32);
* streaming, default threads, ``--big`` pairs: wall time, the same references;
* small calls, default backend (``backend=None``), default threads, 1e3 / 1e4 / 1e5 pairs:
  wall time per call (a loop of calls per sample), against the textbook formula;
* bf16: torch CPU bfloat16 tensors through ``kl_mc`` (fastkl widens them to a float32
  copy today: labelled as such), against the float32 row of the same size.

Data: x ~ N(0, 1), logq = log N(x; 0, 1), logp = log N(x; 1, 1) (l ~ N(-0.5, 1)). Every
candidate's value is checked against a float64 reference (1e-5 relative) before it is
timed. Prints a markdown table; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np

import fastkl
from fastkl.backends.numba import mc as nmc

try:
    from fastkl.backends.cython import _mc as cy_k
except ImportError:  # pragma: no cover
    cy_k = None

LOG_SQRT_2PI = 0.9189385332046727


def make(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    q = (-0.5 * x * x - LOG_SQRT_2PI).astype(np.float32)
    p = (-0.5 * (x - 1.0) ** 2 - LOG_SQRT_2PI).astype(np.float32)
    return q, p


def ref_mean(q, p, est):
    l = p.astype(np.float64) - q.astype(np.float64)
    if est == "k1":
        return float(np.mean(-l))
    if est == "k2":
        return float(np.mean(0.5 * l * l))
    return float(np.mean(np.expm1(l) - l))


def set_lanes(on: bool) -> None:
    nmc.F32_LANES = on
    if cy_k is not None:
        cy_k.set_f32_lanes(on)


def textbook(q, p):
    l = p - q
    return float(np.mean(np.exp(l) - 1 - l))


def timed(fn, cpu: bool, inner: int = 1) -> float:
    clock = time.process_time if cpu else time.perf_counter
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / inner


def run_rows(cands: dict, rounds: int, cpu: bool, inner: int = 1) -> dict:
    """cands: name -> (lanes or None, fn, check value or None). Returns name -> min seconds."""
    best = {k: math.inf for k in cands}
    for _ in range(rounds):
        for name, (lanes, fn, _) in cands.items():
            if lanes is not None:
                set_lanes(lanes)
            best[name] = min(best[name], timed(fn, cpu, inner))
    set_lanes(True)
    return best


def check(cands: dict) -> None:
    for name, (lanes, fn, want) in cands.items():
        if want is None:
            continue
        if lanes is not None:
            set_lanes(lanes)
        got = fn()
        if not abs(got - want) <= 1e-5 * abs(want):
            raise SystemExit(f"{name}: {got!r} != reference {want!r}")
    set_lanes(True)


def fk_cands(q, p, backends, ests, threads=None):
    out = {}
    for est in ests:
        want = ref_mean(q, p, est)
        for be in backends:
            for lanes in (False, True):
                tag = f"{be} {est} mean {'after' if lanes else 'before'}"
                out[tag] = (lanes, (lambda e=est, b=be: fastkl.kl_mc(q, p, e, backend=b)), want)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--big", type=float, default=5e7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    backends = [b for b in ("numba", "cython") if b in fastkl.available_backends()]
    ests = ("k3", "k1", "k2")
    results = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cpus", "load_start": os.getloadavg()}
    lines = []

    # ---- in cache, 1 thread
    n = 10**6
    q, p = make(n)
    buf = np.empty_like(p)
    cands = {"np.exp(logp, out=buf)": (None, lambda: np.exp(p, out=buf), None),
             "numpy textbook k3": (None, lambda: textbook(q, p), ref_mean(q, p, "k3"))}
    cands.update(fk_cands(q, p, backends, ests))
    with fastkl.threads(1):
        check(cands)
        for _ in range(2):  # warm-up (JIT, pages)
            run_rows(cands, 1, True)
        t = run_rows(cands, args.rounds, True)
    base = t["np.exp(logp, out=buf)"]
    lines += [f"### in cache: {n:.0e} float32 pairs, 1 thread, CPU time, min of {args.rounds}",
              "", "| op | before ns/el | after ns/el | after / np.exp | before / np.exp |",
              "| --- | ---: | ---: | ---: | ---: |",
              f"| np.exp(logp, out=buf) alone | {base / n * 1e9:.3f} | | 1.00 | |",
              f"| numpy textbook k3 | {t['numpy textbook k3'] / n * 1e9:.3f} | | "
              f"{t['numpy textbook k3'] / base:.2f} | |"]
    for be in backends:
        for est in ests:
            b = t[f"{be} {est} mean before"]
            a = t[f"{be} {est} mean after"]
            lines.append(f"| {be} {est} mean | {b / n * 1e9:.3f} | {a / n * 1e9:.3f} | "
                         f"{a / base:.2f} | {b / base:.2f} |")
    results["incache"] = {k: v / n for k, v in t.items()}

    # ---- streaming, default threads
    n = int(args.big)
    q, p = make(n, 1)
    buf = np.empty_like(p)
    cands = {"np.exp(logp, out=buf)": (None, lambda: np.exp(p, out=buf), None),
             "numpy textbook k3": (None, lambda: textbook(q, p), ref_mean(q, p, "k3"))}
    cands.update(fk_cands(q, p, backends, ests))
    check(cands)
    run_rows(cands, 1, False)
    r = max(3, args.rounds // 3)
    t = run_rows(cands, r, False)
    tb = t["numpy textbook k3"]
    lines += ["", f"### streaming: {n:.0e} float32 pairs, {fastkl.get_num_threads()} threads, "
              f"wall time, min of {r}", "",
              "| op | before ms | after ms | textbook k3 / after | textbook k3 / before | "
              "after / np.exp |", "| --- | ---: | ---: | ---: | ---: | ---: |",
              f"| np.exp(logp, out=buf) alone | {t['np.exp(logp, out=buf)'] * 1e3:.1f} | | | | |",
              f"| numpy textbook k3 | {tb * 1e3:.1f} | | | | |"]
    for be in backends:
        for est in ests:
            b = t[f"{be} {est} mean before"]
            a = t[f"{be} {est} mean after"]
            lines.append(f"| {be} {est} mean | {b * 1e3:.1f} | {a * 1e3:.1f} | {tb / a:.1f} | "
                         f"{tb / b:.1f} | {a / t['np.exp(logp, out=buf)']:.2f} |")
    results["stream"] = dict(t)

    # ---- bf16 (torch CPU bfloat16: widened to a float32 copy by fastkl today)
    try:
        import torch

        qt = torch.from_numpy(q).to(torch.bfloat16)
        pt = torch.from_numpy(p).to(torch.bfloat16)
        qb, pb = qt.float().numpy(), pt.float().numpy()
        want = ref_mean(qb, pb, "k3")
        cands = {"bf16 k3 mean (torch bf16 -> float32 copy)":
                 (True, lambda: fastkl.kl_mc(qt, pt, "k3"), want),
                 "f32 k3 mean (same values)": (True, lambda: fastkl.kl_mc(qb, pb, "k3"), want)}
        check(cands)
        t = run_rows(cands, r, False)
        a, b = t["bf16 k3 mean (torch bf16 -> float32 copy)"], t["f32 k3 mean (same values)"]
        lines += ["", f"### bf16, {n:.0e} pairs, default backend, lanes on, wall, min of {r}", "",
                  "| op | ms | / float32 |", "| --- | ---: | ---: |",
                  f"| k3 mean, torch bfloat16 (converted float32 copy) | {a * 1e3:.1f} | "
                  f"{a / b:.2f} |", f"| k3 mean, float32 | {b * 1e3:.1f} | 1.00 |"]
        results["bf16"] = dict(t)
    except ImportError:
        lines += ["", "(bf16 row skipped: torch not installed)"]

    # ---- small calls, default backend
    lines += ["", "### small calls: default backend (backend=None), default threads, wall per "
              f"call, min of {args.rounds}", "",
              "| pairs | before us | after us | textbook k3 us | textbook / after | "
              "textbook / before |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    results["small"] = {}
    for n in (1000, 10000, 100000):
        q, p = make(n, 2)
        want = ref_mean(q, p, "k3")
        cands = {"textbook": (None, lambda q=q, p=p: textbook(q, p), want),
                 "before": (False, lambda q=q, p=p: fastkl.kl_mc(q, p, "k3"), want),
                 "after": (True, lambda q=q, p=p: fastkl.kl_mc(q, p, "k3"), want)}
        check(cands)
        inner = max(1, int(2e6 // n))
        run_rows(cands, 1, False, inner)
        t = run_rows(cands, args.rounds, False, inner)
        lines.append(f"| {n:.0e} | {t['before'] * 1e6:.1f} | {t['after'] * 1e6:.1f} | "
                     f"{t['textbook'] * 1e6:.1f} | {t['textbook'] / t['after']:.2f} | "
                     f"{t['textbook'] / t['before']:.2f} |")
        results["small"][n] = dict(t)

    results["load_end"] = os.getloadavg()
    head = (f"machine: {results['machine']}; default backend: "
            f"{fastkl.available_backends()[0]}; load average at start "
            f"{results['load_start'][0]:.2f}, at end {results['load_end'][0]:.2f}")
    print(head)
    print()
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
