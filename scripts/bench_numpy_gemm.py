#!/usr/bin/python3
"""numpy's float32 matmul GFLOP/s on square matrices: the baseline `moe-bench gemm` compares our sgemm against.

Run with Debian's /usr/bin/python3 (numpy on libopenblas0-pthread). `moe-bench gemm` runs it with OPENBLAS_L2_SIZE
unset, the thread counts pinned and OPENBLAS_CORETYPE set to the fastest kernels the CPU supports (yours when you set
it; else from /proc/cpuinfo: COOPERLAKE for AVX-512 F/BW/VL/DQ + BF16, SKYLAKEX without BF16, HASWELL for AVX2 + FMA),
because Debian's OpenBLAS 0.3.21 falls back to its slow Prescott kernels on CPUs it does not know; by hand, e.g.:
    env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=SKYLAKEX OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 \\
        /usr/bin/python3 scripts/bench_numpy_gemm.py --sizes 256,512,1024,2048 --reps 20
The "blas" line below names the kernels OpenBLAS actually runs (e.g. "SkylakeX", or "Prescott" for the fallback).

Prints one line per fact, for a program to read:
    blas <which BLAS library numpy called, as the library itself reports it>
    gflops <n> <best GFLOP/s over the timed reps>
"""
import argparse
import ctypes
import time

import numpy as np


def loaded_blas_libraries():
    """Paths of the BLAS-like shared libraries mapped into this process (numpy loads its BLAS on import)."""
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if any(name in path for name in ("blas", "mkl", "blis")) and ".so" in path:
                paths.add(path)
    return sorted(paths)


def describe_blas():
    """What numpy actually calls: threadpoolctl when installed, else /proc/self/maps plus OpenBLAS's own report."""
    try:
        from threadpoolctl import threadpool_info

        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if infos:
            i = infos[0]
            return f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, " \
                   f"{i.get('num_threads')} threads) {i.get('filepath')}"
    except ImportError:
        pass
    libraries = loaded_blas_libraries()
    for path in sorted(libraries, key=lambda p: "libopenblas" not in p):  # the real library before its aliases
        if "openblas" not in path:
            continue
        lib = ctypes.CDLL(path)
        lib.openblas_get_config.restype = ctypes.c_char_p
        lib.openblas_get_corename.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
        version = " ".join(config.split()[:2])  # "OpenBLAS 0.3.21"
        return f"{version} ({lib.openblas_get_corename().decode()}, {lib.openblas_get_num_threads()} threads) {path}"
    return "unknown BLAS: " + (", ".join(libraries) or "no BLAS library mapped")


def best_gflops(n, reps, warmup=2):
    rng = np.random.default_rng(n)
    a = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    b = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    c = np.empty((n, n), dtype=np.float32)
    for _ in range(warmup):
        np.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512,1024,2048", help="comma-separated square sizes")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per size (best is kept)")
    args = parser.parse_args()
    print("blas", describe_blas(), flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        print("gflops", n, f"{best_gflops(n, args.reps):.2f}", flush=True)


if __name__ == "__main__":
    main()
