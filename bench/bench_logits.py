"""Side-by-side benchmark of the full-vocabulary ops, in one run, on the same arrays.

    python bench/bench_logits.py                          # [512, 128000] float32
    python bench/bench_logits.py --rows 64 --vocab 32000 --dtype float64 --threads 1
    python bench/bench_logits.py --rows 4096 --vocab 131072 --no-peers --json out.json

For every implementation in ``registry_logits.implementations()`` (numpy + logsumexp, scipy,
torch when importable, each available fastkl backend) and every op (``kl``, ``jsd``,
``entropy``, ``token``, ``kl_grad``), the result is first checked against the float64
reference, then timed (best of ``--repeats``). The roofline is the best streaming read of
both arrays. Prints a markdown table: time, GB/s of input (the arrays the op reads), speed-up
over each peer for the same op, % of the roofline. Never asserts a timing; exits 1 if any
implementation disagrees with the reference. The peers materialise several ``[rows, vocab]``
float temporaries: ``--peers-max`` skips them above that many elements.
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
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--dtype", choices=("float16", "float32", "float64"), default="float32")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls, best kept (default 5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for numba / OpenMP / torch (default: all cores)")
    ap.add_argument("--backends", default=None,
                    help="comma-separated fastkl backends (default: all available; the numpy "
                    "reference backend only up to --peers-max elements)")
    ap.add_argument("--no-peers", action="store_true", help="time fastkl backends only")
    ap.add_argument("--peers-max", type=float, default=2e8,
                    help="skip the peers (and fastkl's numpy backend) above this many elements "
                    "per array (default 2e8: their temporaries would not fit)")
    ap.add_argument("--ops", default=None, help="comma-separated subset of the ops")
    ap.add_argument("--budget", type=float, default=5.0,
                    help="stop repeating an implementation after this many seconds (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    _common.set_threads(args.threads)  # before numba / the OpenMP runtime / torch load
    import registry_logits as reg
    from registry import torch_module

    import fastkl

    torch = torch_module()
    if torch is not None and args.threads is not None:
        torch.set_num_threads(args.threads)

    n = args.rows * args.vocab
    small = n <= args.peers_max
    avail = fastkl.available_backends()
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = [b for b in avail if b != "numpy" or small]
    ops = reg.OPS if args.ops is None else tuple(o.strip() for o in args.ops.split(","))
    impls = [i for i in reg.implementations(backends, peers=small and not args.no_peers)
             if i.op in ops]

    t0 = time.perf_counter()
    case = reg.make_case(args.rows, args.vocab, args.dtype, seed=args.seed)
    t_make = time.perf_counter() - t0
    info = _common.machine(args.threads)
    print(f"# fastkl {fastkl.__version__} logits benchmark: [{case.rows:,}, {case.vocab:,}] "
          f"{args.dtype} ({case.input_bytes('kl') / 1e6:.0f} MB for two arrays), best of "
          f"{args.repeats}")
    print()
    print(f"- machine: {_common.stamp(info)}")
    print(f"- fastkl backends timed: {', '.join(backends)}"
          + ("" if small else f"; peers skipped above {args.peers_max:.0e} elements"))
    print(f"- data: a = 2 + 3 N(0,1), b = 0.8 a + N(0,1) per element (made in {t_make:.1f} s)")
    if info.get("load_avg", 0.0) > 0.5 * (os.cpu_count() or 1):
        print(f"- WARNING: load average {info['load_avg']:.1f} on {os.cpu_count()} cores at "
              "start: other processes compete for the CPU; timings will be noisy")
    sys.stdout.flush()

    result = _common.run_suite(
        impls, case, lambda op: reg.reference(op, case), reg.matches, reg.roofline_impls(),
        reg.roofline_reference(case), case.input_bytes("kl"), case.input_bytes, args.repeats,
        args.budget)
    print()
    _common.print_table(result)
    print()
    print("GB/s = bytes of the arrays the op reads (both for kl, jsd, kl_grad; one for entropy, "
          "token) / best time; vs X = X's time / this time for the same op; % of roofline = "
          f"GB/s / roofline GB/s ({result['roofline_gbs']:.2f}).")
    if args.json:
        result.update(suite="logits", shape=[case.rows, case.vocab], size=case.n,
                      dtype=args.dtype, machine=info)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    bad = _common.failures(result)
    if bad:
        print(f"\nFAILED: {len(bad)} implementation(s): " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
