"""Import time of ``fastkl`` and first-call latency per backend, each in a fresh process.

    python bench/latency.py                 # 3 fresh processes per measurement
    python bench/latency.py --runs 5 --n 1000 --dtype float64

For each run a new ``python`` process measures: ``import numpy``, then ``import fastkl``
(numpy already loaded, so this is fastkl's own cost); and, per backend, the first call of
``kl_mc``, then the first ``kl_mc_stats`` and ``kl_mc_grad`` (which may compile other
kernels), then a second ``kl_mc`` (warm); then the same for the logits ops on the pairs
reshaped to 8 rows. A numba on-disk cache, if the backend uses one,
makes the first run slower than the later ones: all runs are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_IMPORT = r"""
import json, time
t0 = time.perf_counter(); import numpy; t1 = time.perf_counter()
import fastkl; t2 = time.perf_counter()
print(json.dumps({"numpy": t1 - t0, "fastkl": t2 - t1,
                  "backends": fastkl.available_backends()}))
"""

_CALLS = r"""
import json, sys, time
import numpy as np
import fastkl
be, n, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
a = rng.standard_normal(n).astype(dtype)
b = rng.standard_normal(n).astype(dtype)
out = {}
def timed(key, fn, *args, **kw):
    t = time.perf_counter(); fn(*args, **kw); out[key] = time.perf_counter() - t
timed("kl_mc first", fastkl.kl_mc, a, b, backend=be)
timed("kl_mc_stats first", fastkl.kl_mc_stats, a, b, backend=be)
timed("kl_mc_grad first", fastkl.kl_mc_grad, a, b, backend=be)
timed("kl_mc second", fastkl.kl_mc, a, b, backend=be)
la = a[: (n // 8) * 8].reshape(8, -1)
lb = b[: (n // 8) * 8].reshape(8, -1)
tok = np.zeros(8, dtype=np.int64)
timed("kl_logits first", fastkl.kl_logits, la, lb, backend=be)
timed("jsd_logits first", fastkl.jsd_logits, la, lb, backend=be)
timed("entropy_logits first", fastkl.entropy_logits, la, backend=be)
timed("token_logprobs first", fastkl.token_logprobs, lb, tok, backend=be)
timed("kl_logits_grad first", fastkl.kl_logits_grad, la, lb, backend=be)
timed("kl_logits second", fastkl.kl_logits, la, lb, backend=be)
print(json.dumps(out))
"""


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if res.returncode != 0:
        raise RuntimeError(f"subprocess failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v * 1e3:.1f}" for v in values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fastkl import time and first-call latency")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per measurement")
    ap.add_argument("--n", type=int, default=1000, help="pairs in the calls (default 1000)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--backends", default=None, help="comma-separated (default: all available)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    results: dict = {}

    imports = [_run(_IMPORT) for _ in range(args.runs)]
    avail = imports[0]["backends"]
    backends = args.backends.split(",") if args.backends else avail
    print(f"# fastkl latency ({sys.executable}; cwd for the subprocesses: bench/, "
          f"{args.runs} fresh processes each, {args.n} {args.dtype} pairs; times in ms)")
    print()
    print("| what | min ms | all runs ms |")
    print("| --- | ---: | --- |")
    for key, label in (("numpy", "import numpy"), ("fastkl", "import fastkl (after numpy)")):
        vals = [r[key] for r in imports]
        results[label] = vals
        print(f"| {label} | {min(vals) * 1e3:.1f} | {_fmt(vals)} |")
    for be in backends:
        runs = [_run(_CALLS, be, str(args.n), args.dtype) for _ in range(args.runs)]
        for key in runs[0]:
            vals = [r[key] for r in runs]
            results[f"{be}: {key}"] = vals
            print(f"| {be}: {key} | {min(vals) * 1e3:.1f} | {_fmt(vals)} |")
    print()
    print(f"backends available: {', '.join(avail)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"suite": "latency", "n": args.n, "dtype": args.dtype,
                       "seconds": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
