"""Quick probe of the cpp causal-linear-attention backend against the machine's sgemm peak (not the benchmark
suite): `PYTHONPATH=. python benchmarks/la_cpp_probe.py [--B 2 --H 8 --T 2048 --D 64 --feature-map elu+1]`.
Prints forward and forward+backward effective GFLOP/s (4*B*H*T*K*V per forward, 3x that with the backward) and
their fraction of the peak (best of 10 float32 1024x1024 matmuls)."""
import argparse
import statistics
import time

import torch

import fastml


def best_and_median(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--feature-map", default=None)
    ap.add_argument("--normalize", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    peak = 2 * 1024**3 / best_and_median(lambda: torch.matmul(x, y), 10)[0] / 1e9
    q, k, v = (torch.randn(a.B, a.H, a.T, a.D, dtype=dtype) * 0.5 for _ in range(3))
    opts = dict(feature_map=a.feature_map, normalize=a.normalize, backend="cpp")
    flops = 4 * a.B * a.H * a.T * a.D * a.D

    def fwd():
        with torch.no_grad():
            fastml.causal_linear_attention(q, k, v, **opts)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    go = torch.randn_like(v)

    def fwd_bwd():
        o = fastml.causal_linear_attention(*leaves, **opts)
        o.backward(go)

    print(f"peak {peak:.1f} GFLOP/s (sgemm 1024, {torch.get_num_threads()} threads)")
    for name, fn, f in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3 * flops)):
        best, med = best_and_median(fn, a.reps)
        print(f"{name:8s} median {med * 1e3:8.2f} ms  best {best * 1e3:8.2f} ms  "
              f"{f / med / 1e9:7.1f} GFLOP/s = {100 * f / med / 1e9 / peak:5.1f}% of peak (median)")


if __name__ == "__main__":
    main()
