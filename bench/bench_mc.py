"""Side-by-side benchmark of the Monte Carlo KL estimators, in one run, on the same arrays.

    python bench/bench_mc.py                      # 5e7 float32 pairs (400 MB of input)
    python bench/bench_mc.py --size 1e6 --dtype float64 --repeats 3 --threads 1
    python bench/bench_mc.py --size 1e7 --json out.json

For every implementation in ``registry.implementations()`` (numpy textbook, torch textbook
when importable, each available fastkl backend) and every op, the result is first checked
against the float64 reference, then timed (best of ``--repeats``). The roofline is the best
streaming read of the same bytes (``np.add.reduce`` over both arrays, and a numba ``prange``
sum). Prints a markdown table: time, GB/s of input, speed-up over each peer for the same op,
and % of the roofline bandwidth. Never asserts a timing. Exits 1 if any implementation
disagrees with the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=5e7, help="pairs (default 5e7)")
    ap.add_argument("--dtype", choices=("float16", "float32", "float64"), default="float32")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls, best kept (default 5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for numba / OpenMP / torch (default: all cores)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated fastkl backends (default: all available; the numpy "
                    "reference backend only up to --numpy-backend-max pairs)")
    ap.add_argument("--numpy-backend-max", type=float, default=2e7,
                    help="skip the (unoptimized, memory-hungry) fastkl numpy backend above this "
                    "size unless named in --backends (default 2e7)")
    ap.add_argument("--no-peers", action="store_true", help="time fastkl backends only")
    ap.add_argument("--ops", default=None, help="comma-separated subset of the ops")
    ap.add_argument("--budget", type=float, default=5.0,
                    help="stop repeating an implementation after this many seconds (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    _common.set_threads(args.threads)  # before numba / the OpenMP runtime / torch load
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
    impls = [i for i in reg.implementations(backends, peers=not args.no_peers) if i.op in ops]

    t0 = time.perf_counter()
    case = reg.make_case(int(args.size), args.dtype, seed=args.seed)
    t_make = time.perf_counter() - t0
    info = _common.machine(args.threads)
    print(f"# fastkl {fastkl.__version__} MC benchmark: {case.n:,} {args.dtype} pairs "
          f"({case.input_bytes('k3') / 1e6:.0f} MB of input), best of {args.repeats}")
    print()
    print(f"- machine: {_common.stamp(info)}")
    print(f"- fastkl backends timed: {', '.join(backends)}")
    print(f"- data: x ~ N(0,1), logq = log N(x; 0,1), logp = log N(x; 1,1) (made in "
          f"{t_make:.1f} s); 2-D ops on [{case.logq2.shape[0]:,}, {case.logq2.shape[1]}] "
          f"with a padding mask ({int(case.mask2.sum()):,} tokens)")
    if info.get("load_avg", 0.0) > 0.5 * (os.cpu_count() or 1):
        print(f"- WARNING: load average {info['load_avg']:.1f} on {os.cpu_count()} cores at "
              "start: other processes compete for the CPU; timings will be noisy")
    sys.stdout.flush()

    result = _common.run_suite(
        impls, case, lambda op: reg.reference(op, case), reg.matches_op, reg.roofline_impls(),
        reg.roofline_reference(case), case.input_bytes("k3"), case.input_bytes, args.repeats,
        args.budget)
    print()
    _common.print_table(result)
    print()
    print("GB/s = bytes of input (logq + logp, + the bool mask for the 2-D op) / best time; "
          "vs X = X's time / this time for the same op; % of roofline = GB/s / roofline GB/s "
          f"({result['roofline_gbs']:.2f}).")
    if args.json:
        result.update(suite="mc", size=case.n, dtype=args.dtype, machine=info)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    bad = _common.failures(result)
    if bad:
        print(f"\nFAILED: {len(bad)} implementation(s): " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
