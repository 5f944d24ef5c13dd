"""Peak extra memory of the logits ops: how much the resident set grows beyond the inputs.

    python bench/memory.py                        # kl_logits on two [4096, 131072] float32
    python bench/memory.py --rows 512 --vocab 128000 --torch

Each op runs in a fresh process that first makes its inputs (and touches every page), then
reads ``ru_maxrss`` before and after the call: the difference is the op's peak extra memory.
fastkl needs O(rows); the log-softmax way (torch ``--torch``, numpy ``--numpy``) needs
several ``[rows, vocab]`` temporaries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys
import numpy as np
rows, vocab, impl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
a = np.empty((rows, vocab), np.float32)
b = np.empty((rows, vocab), np.float32)
rng = np.random.default_rng(0)
for i in range(0, rows, 256):
    x = rng.standard_normal((min(256, rows - i), vocab), dtype=np.float32) * 3
    a[i:i + 256] = x
    b[i:i + 256] = 0.8 * x + rng.standard_normal(x.shape, dtype=np.float32)
if impl == "torch":
    import torch
    import torch.nn.functional as F
    fn = lambda: F.kl_div(F.log_softmax(torch.from_numpy(b), -1),
                          F.log_softmax(torch.from_numpy(a), -1), log_target=True,
                          reduction="none").sum(-1)
elif impl == "numpy":
    from scipy.special import logsumexp
    def fn():
        lp = a - logsumexp(a, axis=-1, keepdims=True)
        lq = b - logsumexp(b, axis=-1, keepdims=True)
        return np.sum(np.exp(lp) * (lp - lq), axis=-1)
else:
    import fastkl
    fastkl.kl_logits(a[:2, :1000], b[:2, :1000], backend=impl)  # load / compile first
    fn = lambda: fastkl.kl_logits(a, b, backend=impl)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"impl": impl, "inputs_mb": (a.nbytes + b.nbytes) / 2**20,
                  "rss_before_mb": before / 1024, "extra_mb": (after - before) / 1024}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--backends", default="cython,numba")
    ap.add_argument("--torch", action="store_true", help="also torch's log_softmax + kl_div")
    ap.add_argument("--numpy", action="store_true", help="also numpy + scipy logsumexp")
    args = ap.parse_args(argv)
    impls = [b for b in args.backends.split(",") if b]
    impls += ["torch"] * args.torch + ["numpy"] * args.numpy
    print(f"kl_logits on two [{args.rows}, {args.vocab}] float32 arrays: peak RSS growth")
    print("| impl | inputs MB | RSS before the call MB | extra MB during the call |")
    print("| --- | ---: | ---: | ---: |")
    for impl in impls:
        res = subprocess.run([sys.executable, "-c", _CHILD, str(args.rows), str(args.vocab),
                              impl], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"| {impl} | failed: {res.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {impl} | {r['inputs_mb']:.0f} | {r['rss_before_mb']:.0f} | "
              f"{r['extra_mb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
