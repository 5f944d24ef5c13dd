"""Measured prototype of issue 12: float32 term lanes for the k1/k2/k3 block partials.

    PYTHONPATH=. python bench/prototypes/f32_lanes.py [--quick] [--asm]

Times, side by side in one run (interleaved rounds, min of the repeats), on the data of
``bench/registry.make_case`` (x ~ N(0,1), p = N(1,1): l ~ N(-0.5, 1), a third of the lanes
have |l| > 1) and, for k3 at the in-cache size, an RL-like case with |l| small (mu = 0.1):

* numpy ``np.exp(logp, out=buf)`` alone (float32 SIMD exp; the per-core target) and the
  numpy textbook k3 mean ``np.mean(np.exp(l) - 1 - l)``;
* ``fastkl.kl_mc(logq, logp, "k3")`` on the numba and cython backends (float64 lanes);
* the numba prototypes of ``f32_kernels.py`` (block partials W, S; ``stats`` adds M2);
* the C prototype ``f32_lanes.c`` built three ways: portable (setup.py's flags, one baseline
  x86-64 version), clones (target_clones x86-64-v4/v3/default, as setup.py) and native.

Threads: numba.set_num_threads, the C prototype's num_threads argument, and
omp_set_num_threads (through ctypes on the libgomp the cython extension loaded) for the
cython backend. 1 thread at 1e6 pairs (8 MB of inputs: L2/L3), 2 threads at 5e7 (streaming).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # bench/ for registry.make_case

import f32_kernels as K  # noqa: E402

CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fPIC",
          "-shared", "-fopenmp", "-std=c11"]
BUILDS = {"portable": [], "clones": ["-DFK_CLONES"], "native": ["-march=native"]}
C_EST = {"k1": 0, "k2": 1, "k3": 2, "k3_split": 3, "rk3": 4}


def build_c(tmp: str, vec_report: bool = False) -> dict:
    libs = {}
    src = os.path.join(HERE, "f32_lanes.c")
    for name, extra in BUILDS.items():
        so = os.path.join(tmp, f"f32_{name}.so")
        cmd = ["gcc", *CFLAGS, *extra, src, "-o", so, "-lm"]
        if vec_report:
            cmd.append("-fopt-info-vec-optimized")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        if vec_report:
            print(f"--- gcc -fopt-info-vec ({name}):")
            print("\n".join(sorted({ln.split(": ", 1)[-1] + "  @" + ln.split(":")[1]
                                   for ln in r.stderr.splitlines() if "vectorized" in ln})))
        lib = ctypes.CDLL(so)
        lib.f32_partials.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_int]
        lib.f32_terms.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_ssize_t]
        libs[name] = lib
    return libs


def c_partials(lib, est: str, q, p, want_m2=False, runs=2, nthreads=1):
    """runs: 0 float64 sum of each term, 1 float32 runs of 8 (separate loop), 2 lanes64."""
    nblk = max(1, -(-q.size // K.BLOCK))
    part = np.zeros((nblk, 3))
    lib.f32_partials(C_EST[est], int(runs), q.ctypes.data, p.ctypes.data, q.size,
                     int(want_m2), part.ctypes.data, nthreads)
    return part


def c_mean(lib, est, q, p, nthreads, runs=2):
    part = c_partials(lib, est, q, p, False, runs, nthreads)
    return part[:, 1].sum() / part[:, 0].sum()


def c_terms(lib, est: str, l):
    l = np.ascontiguousarray(l, np.float32)
    out = np.empty_like(l)
    lib.f32_terms(C_EST[est], l.ctypes.data, out.ctypes.data, l.size)
    return out


def _omp_setter():
    import fastkl.backends._cython_kernels  # noqa: F401  (loads libgomp)

    try:
        gomp = ctypes.CDLL("libgomp.so.1")
        return gomp.omp_set_num_threads
    except OSError:
        return lambda n: None


def candidates(q, p, threads, libs, quick, small=False):
    """name -> (fn, kind); every fn returns the k-estimate's mean (checked) or None."""
    import fastkl

    buf = np.empty_like(p)
    c = {}
    c["numpy np.exp(logp) alone"] = lambda: (np.exp(p, out=buf), None)[1]
    c["numpy textbook k3"] = lambda: float(np.mean((lambda l: np.exp(l) - 1 - l)(p - q)))
    for be in ("numba", "cython"):
        c[f"fastkl {be} k3"] = lambda be=be: float(fastkl.kl_mc(q, p, "k3", backend=be))
        if not quick and not small:
            c[f"fastkl {be} k1"] = lambda be=be: float(fastkl.kl_mc(q, p, "k1", backend=be))
    protos = ["k3_fused_lanes64", "k3_split_lanes64", "k3_fused", "k3_fused_sum64"]
    if not quick and not small:
        protos += ["k1_lanes64", "k2_lanes64", "rk3_fused_lanes64"]
    for name in protos:
        c[f"numba f32 {name}"] = lambda name=name: K.mean(name, q, p)
    if not small:
        c["numba f32 k3_fused_lanes64 stats"] = (
            lambda: K.partials("k3_fused_lanes64", q, p, True)[0, 2] * 0)
    for b, lib in libs.items():
        ests = ["k3", "k3_split"] if (quick or small) else ["k3", "k3_split", "k1", "k2", "rk3"]
        for est in ests:
            c[f"C {b} f32 {est} lanes64"] = (
                lambda lib=lib, est=est: c_mean(lib, est, q, p, threads, 2))
        if b == "clones":
            c["C clones f32 k3 runs8"] = lambda lib=lib: c_mean(lib, "k3", q, p, threads, 1)
            c["C clones f32 k3 sum64"] = lambda lib=lib: c_mean(lib, "k3", q, p, threads, 0)
            if not small:
                c["C clones f32 k3 lanes64 stats"] = (
                    lambda lib=lib: c_partials(lib, "k3", q, p, True, 2, threads)[0, 2] * 0)
    return c


def time_all(cands: dict, repeats: int) -> tuple[dict, dict]:
    """min over ``repeats`` interleaved rounds of (wall time, process CPU time) per candidate.
    The CPU time of a 1-thread call does not count the time the thread waits for a core on
    this shared machine (the wall time does): it is the fairer figure for 1 thread."""
    wall = {k: float("inf") for k in cands}
    cpu = {k: float("inf") for k in cands}
    for _ in range(repeats):  # interleaved: every round times each candidate once
        for k, fn in cands.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            c1 = time.process_time()
            wall[k] = min(wall[k], t1 - t0)
            cpu[k] = min(cpu[k], c1 - c0)
    return wall, cpu


def run_case(label, n, mu, threads, libs, repeats, quick, set_omp):
    from registry import make_case

    case = make_case(n, "float32", mu=mu)
    q, p = case.logq, case.logp
    n = q.size
    K.set_threads(threads)
    set_omp(threads)
    cands = candidates(q, p, threads, libs, quick, small=mu < 0.5)
    # correctness of the means before timing (float64 reference)
    l = p.astype(np.float64) - q.astype(np.float64)
    ref = {"k3": np.mean(np.expm1(l) - l), "k1": np.mean(-l), "k2": np.mean(0.5 * l * l),
           "rk3": np.mean(np.exp(l) * l - np.expm1(l))}
    del l
    for k, fn in cands.items():
        v = fn()
        if v is None or k.endswith("stats") or "textbook" in k:
            continue
        words = k.replace("_", " ").split()
        est = "rk3" if "rk3" in words else "k1" if "k1" in words else "k2" if "k2" in words \
            else "k3"
        assert abs(v / ref[est] - 1) < 1e-5, (k, v, ref[est])
    wall, cpu = time_all(cands, repeats)
    best = cpu if threads == 1 else wall
    base = best["numpy np.exp(logp) alone"]
    tb = best["numpy textbook k3"]
    which = "CPU time (1 thread)" if threads == 1 else "wall time"
    print(f"\n### {label}: n = {n:.3g} float32 pairs, mu = {mu} "
          f"(|l| > 1 in {np.mean(np.abs(p - q) > 1):.0%} of lanes), {threads} thread(s), "
          f"min of {repeats}; ratios on {which}")
    print("| implementation | ns/term (wall) | ns/term (CPU) | time / np.exp "
          "| textbook k3 / time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k, t in best.items():
        print(f"| {k} | {wall[k] / n * 1e9:.3f} | {cpu[k] / n * 1e9:.3f} | {t / base:.2f} "
              f"| {tb / t:.1f} |")
    return best


def show_asm():
    """Vector instructions in the numba term loop (float32 ymm/zmm ops)."""
    import re

    fn = K.KERNELS["k3_fused_lanes64"]
    for sig in fn.signatures:
        asm = fn.inspect_asm(sig)
        ops = re.findall(r"\bv\w+\s+%([xyz])mm", asm)
        ps = re.findall(r"\b(v\w+ps)\s+%[yz]mm", asm)
        pd = re.findall(r"\b(vcvtps2pd|vaddpd)\s+[^\n]*%[yz]mm", asm)
        print(f"numba k3_fused_lanes64 {sig}: vector ops by register: "
              f"x {ops.count('x')}, y {ops.count('y')}, z {ops.count('z')}; "
              f"packed float32 ops on ymm/zmm: {len(ps)} ({sorted(set(ps))[:12]}); "
              f"widen/add pd: {len(pd)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1e6 and 5e6 pairs, 7 repeats")
    ap.add_argument("--asm", action="store_true", help="vectorization reports (gcc, numba)")
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}")
    cpu = os.popen("grep -m1 'model name' /proc/cpuinfo").read().strip()
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, {cpu}, "
          f"numpy {np.__version__}, numba {K.numba.__version__}")
    set_omp = _omp_setter()
    with tempfile.TemporaryDirectory() as tmp:
        libs = build_c(tmp, vec_report=args.asm)
        big = 5_000_000 if args.quick else 50_000_000
        run_case("in cache", 1_000_000, 1.0, 1, libs, args.repeats, args.quick, set_omp)
        run_case("in cache, RL-like small |l|", 1_000_000, 0.1, 1, libs, args.repeats,
                 args.quick, set_omp)
        run_case("streaming", big, 1.0, 2, libs, args.repeats, args.quick, set_omp)
        if args.asm:
            show_asm()
    print(f"\nuptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
