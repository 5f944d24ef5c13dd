"""What the benchmark scripts share: thread settings, the machine stamp, timing, the
check-then-time loop over a registry, and the markdown table.

A run is a dict (``run_suite``) that ``bench_mc.py`` / ``bench_logits.py`` print as a table
and write as JSON (``--json``), and that ``report.py`` collects across sizes and thread counts.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable


def set_threads(n: int | None) -> None:
    """Thread count for numba, OpenMP and torch: call before they are imported."""
    if n is not None:
        for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(n)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None) -> dict:
    """The stamp every report carries: CPU, cores, threads, library versions, the ISA the
    Cython kernels run."""
    import numpy as np

    import fastkl

    info = {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "python": platform.python_version(),
        "fastkl": fastkl.__version__,
        "numpy": np.__version__,
        "backends": fastkl.available_backends(),
    }
    for mod in ("numba", "scipy", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        from fastkl.backends import cython as cython_backend

        info["cython_isa"] = cython_backend.isa()
    except ImportError:
        pass
    try:
        info["load_avg"] = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    return info


def stamp(info: dict) -> str:
    libs = ", ".join(f"{k} {info[k]}" for k in ("numpy", "numba", "scipy", "torch") if k in info)
    isa = f"; Cython kernels: {info['cython_isa']}" if "cython_isa" in info else ""
    return (f"{info['cpu']} ({info['machine']}), {info['cores']} cores, threads="
            f"{info['threads']}; python {info['python']}, fastkl {info['fastkl']}, {libs}{isa}")


def best_time(fn: Callable, case, repeats: int, budget: float) -> float:
    """Best of ``repeats`` calls, stopping early once ``budget`` seconds are spent, but never
    before 3 calls (or ``repeats`` if fewer): on a shared machine one call can take 5x the
    next, and a peer timed once would make every ratio against it a fiction."""
    best, spent = float("inf"), 0.0
    for k in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(case)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget and k >= 2:
            break
    return best


def run_suite(impls, case, reference: Callable, matches: Callable, rooflines, roof_ref: float,
              roof_bytes: int, input_bytes: Callable[[str], int], repeats: int,
              budget: float) -> dict:
    """Roofline first (streaming reads of ``roof_bytes``, their sum checked against
    ``roof_ref``), then every implementation: checked against ``reference(op)`` (the first
    call, which also pays JIT compiles), then timed. Never asserts a timing."""
    import numpy as np

    roof = []
    for name, fn in rooflines:
        got = fn(case)  # also the warm-up (numba compile)
        ok = bool(np.isclose(got, roof_ref, rtol=1e-4))
        t = best_time(fn, case, repeats, budget)
        roof.append({"impl": name, "time_s": t, "gbs": roof_bytes / t / 1e9, "ok": ok})
    good = [r["gbs"] for r in roof if r["ok"]]
    roof_gbs = max(good) if good else float("nan")

    refs: dict = {}
    rows = []
    for im in impls:
        if im.op not in refs:
            refs[im.op] = reference(im.op)
        row = {"impl": im.impl, "op": im.op, "kind": im.kind, "time_s": None, "gbs": None}
        try:
            got = im.fn(case)
        except Exception as exc:  # report it, keep going
            row["status"] = f"error: {type(exc).__name__}: {exc}"
            rows.append(row)
            continue
        if not matches(im.op, got, refs[im.op]):
            row["status"] = "MISMATCH with the reference"
            rows.append(row)
            continue
        del got
        t = best_time(im.fn, case, repeats, budget)
        row.update(status="ok", time_s=t, gbs=input_bytes(im.op) / t / 1e9)
        rows.append(row)
    return {"roofline": roof, "roofline_gbs": roof_gbs, "roofline_bytes": roof_bytes,
            "rows": rows}


def peers_of(result: dict) -> list[str]:
    seen: list[str] = []
    for r in result["rows"]:
        if r["kind"] == "peer" and r["impl"] not in seen:
            seen.append(r["impl"])
    return seen


def print_table(result: dict, file=None) -> None:
    """Markdown: time, GB/s of input, the speed-up over each peer for the same op (peer time /
    time), and the percentage of the roofline bandwidth."""
    file = file or sys.stdout
    peers = peers_of(result)
    best = {(r["impl"], r["op"]): r["time_s"] for r in result["rows"] if r["time_s"]}
    roof = result["roofline_gbs"]
    head = ["impl", "op", "time ms", "GB/s"] + [f"vs {p}" for p in peers] + ["% of roofline"]
    print("| " + " | ".join(head) + " |", file=file)
    print("| --- | --- | " + " | ".join(["---:"] * (len(head) - 2)) + " |", file=file)
    for r in result["roofline"]:
        note = "" if r["ok"] else " (wrong sum!)"
        cells = [f"roofline: {r['impl']}{note}", "read the inputs", f"{r['time_s'] * 1e3:.2f}",
                 f"{r['gbs']:.2f}"] + [""] * len(peers) + [f"{100 * r['gbs'] / roof:.0f}%"]
        print("| " + " | ".join(cells) + " |", file=file)
    for r in result["rows"]:
        if r["time_s"] is None:
            cells = [r["impl"], r["op"], r["status"], ""] + [""] * len(peers) + [""]
        else:
            ratios = []
            for p in peers:
                pt = best.get((p, r["op"]))
                ratios.append("" if pt is None or p == r["impl"] else f"{pt / r['time_s']:.2f}x")
            cells = [r["impl"], r["op"], f"{r['time_s'] * 1e3:.2f}", f"{r['gbs']:.2f}"] + ratios \
                + [f"{100 * r['gbs'] / roof:.0f}%"]
        print("| " + " | ".join(cells) + " |", file=file)


def failures(result: dict) -> list[str]:
    return [f"{r['impl']}|{r['op']}: {r['status']}" for r in result["rows"] if r["status"] != "ok"]
