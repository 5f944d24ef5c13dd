"""Side-by-side benchmark of the Monte Carlo KL estimators, in one run, on the same arrays.

    python bench/bench_mc.py                      # 5e7 float32 pairs (400 MB of input)
    python bench/bench_mc.py --size 1e6 --dtype float64 --repeats 3 --threads 1

For every implementation in ``registry.implementations()`` (numpy textbook, torch textbook
when importable, each available fastkl backend) and every op, the result is first checked
against the float64 reference (rtol 1e-5), then timed (best of ``--repeats``). The roofline
is the best streaming read of the same bytes (``np.add.reduce`` over both arrays, and a
numba ``prange`` sum when numba is present). Prints a markdown table: time, GB/s of input,
speed-up over the numpy textbook formula for the same op, and % of the roofline bandwidth.
Never asserts a timing. Exits 1 if any implementation disagrees with the reference.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=5e7, help="pairs (default 5e7)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls, best kept (default 5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for numba / OpenMP / torch (default: all cores)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated fastkl backends (default: all available; the numpy "
                    "reference backend only up to --numpy-backend-max pairs)")
    ap.add_argument("--numpy-backend-max", type=float, default=2e7,
                    help="skip the (unoptimized, memory-hungry) fastkl numpy backend above this "
                    "size unless named in --backends (default 2e7)")
    ap.add_argument("--ops", default=None, help="comma-separated subset of the ops")
    ap.add_argument("--budget", type=float, default=5.0,
                    help="stop repeating an implementation after this many seconds (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _best(fn, case, repeats: int, budget: float) -> float:
    best, spent = float("inf"), 0.0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(case)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget:
            break
    return best


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.threads is not None:
        # before numba / the OpenMP runtime / torch are loaded
        for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import numpy as np
    import registry as reg

    import fastkl

    torch = reg.torch_module()
    if torch is not None and args.threads is not None:
        torch.set_num_threads(args.threads)

    avail = fastkl.available_backends()
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = [b for b in avail if b != "numpy" or args.size <= args.numpy_backend_max]
    ops = reg.OPS if args.ops is None else tuple(o.strip() for o in args.ops.split(","))
    impls = [i for i in reg.implementations(backends) if i.op in ops]

    t0 = time.perf_counter()
    case = reg.make_case(int(args.size), args.dtype, seed=args.seed)
    t_make = time.perf_counter() - t0
    threads = args.threads or os.cpu_count()
    print(f"# fastkl {fastkl.__version__} MC benchmark: {case.n:,} {args.dtype} pairs "
          f"({case.input_bytes('k3') / 1e6:.0f} MB of input), best of {args.repeats}")
    print()
    versions = [f"numpy {np.__version__}"]
    try:
        import numba
        versions.append(f"numba {numba.__version__}")
    except ImportError:
        pass
    if torch is not None:
        versions.append(f"torch {torch.__version__}")
    print(f"- machine: {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} cores, threads={threads}; python {platform.python_version()}, "
          + ", ".join(versions))
    print(f"- fastkl backends available: {', '.join(avail)}; timed: {', '.join(backends)}")
    print(f"- data: x ~ N(0,1), logq = log N(x; 0,1), logp = log N(x; 1,1) (made in "
          f"{t_make:.1f} s); 2-D ops on [{case.logq2.shape[0]:,}, {case.logq2.shape[1]}] "
          f"with a padding mask ({int(case.mask2.sum()):,} tokens)")
    if args.size > args.numpy_backend_max and "numpy" in avail and "numpy" not in backends:
        print("- fastkl numpy (the unoptimized reference backend) skipped at this size; "
              "name it in --backends to include it")
    try:
        load = os.getloadavg()[0]
        if load > 0.5 * (os.cpu_count() or 1):
            print(f"- WARNING: load average {load:.1f} on {os.cpu_count()} cores at start: "
                  "other processes compete for the CPU; multi-threaded timings will be noisy "
                  "(compare with --threads 1)")
    except (AttributeError, OSError):
        pass
    sys.stdout.flush()

    # roofline: best streaming read of logq + logp
    roof_rows = []
    ref_sum = reg.roofline_reference(case)
    for name, fn in reg.roofline_impls():
        got = fn(case)  # also the warm-up (numba compile)
        ok = reg.matches(got, ref_sum, rtol=1e-4)
        t = _best(fn, case, args.repeats, args.budget)
        roof_rows.append((name, t, ok))
    nbytes = case.input_bytes("k3")
    roof_t = min(t for _, t, ok in roof_rows if ok) if any(ok for *_, ok in roof_rows) else None
    roof_gbs = nbytes / roof_t / 1e9 if roof_t else float("nan")

    refs = {op: reg.reference(op, case) for op in ops}
    results = []  # (impl, op, time or None, gbs, status)
    failures = []
    for im in impls:
        try:
            got = im.fn(case)  # warm-up, JIT compile, correctness
        except Exception as exc:  # report, keep going
            results.append((im, None, f"error: {type(exc).__name__}: {exc}"))
            failures.append(im.id)
            continue
        if not reg.matches(got, refs[im.op]):
            results.append((im, None, f"MISMATCH: {got!r} vs reference {refs[im.op]!r}"))
            failures.append(im.id)
            continue
        results.append((im, _best(im.fn, case, args.repeats, args.budget), "ok"))

    numpy_t = {im.op: t for im, t, s in results if im.impl == "numpy textbook" and t}
    print()
    print("| impl | op | time ms | GB/s | vs numpy | % of roofline |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, t, ok in roof_rows:
        gbs = nbytes / t / 1e9
        note = "" if ok else " (wrong sum!)"
        print(f"| roofline: {name}{note} | read logq+logp | {t * 1e3:.2f} | {gbs:.2f} | | "
              f"{100 * gbs / roof_gbs:.0f}% |")
    for im, t, status in results:
        if t is None:
            print(f"| {im.impl} | {im.op} | {status} | | | |")
            continue
        gbs = case.input_bytes(im.op) / t / 1e9
        ratio = f"{numpy_t[im.op] / t:.2f}x" if im.op in numpy_t else ""
        print(f"| {im.impl} | {im.op} | {t * 1e3:.2f} | {gbs:.2f} | {ratio} | "
              f"{100 * gbs / roof_gbs:.0f}% |")
    print()
    print("GB/s = bytes of input (logq + logp, + the bool mask for the 2-D op) / best time; "
          "vs numpy = numpy textbook time / time for the same op; % of roofline = GB/s / "
          f"roofline GB/s ({roof_gbs:.2f}).")
    if failures:
        print(f"\nFAILED: {len(failures)} implementation(s) disagree with the reference: "
              + ", ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
