"""Times the triton backend of causal linear attention on a CUDA GPU: forward and forward+backward, bfloat16.

Run from the repository root on a GPU machine: `python benchmarks/la_gpu_probe.py`. It prints one line per shape
and normalize setting (median ms by triton.testing.do_bench, and the forward's effective bandwidth over q, k, v, o),
then the configs the autotuner picked.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

import fastml  # noqa: E402
from fastml.kernels import linear_attention, linear_attention_bwd  # noqa: E402

SHAPES = [(4, 4096, 64, 128, 128), (8, 2048, 32, 256, 256), (2, 16384, 16, 128, 128)]  # B, T, H, K, V


def probe(B, T, H, K, V, normalize, feature_map, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(B, H, T, K, device="cuda", generator=g, dtype=dtype) * 0.5 for _ in range(2))
    v = torch.randn(B, H, T, V, device="cuda", generator=g, dtype=dtype)
    do = torch.randn(B, H, T, V, device="cuda", generator=g, dtype=dtype)
    opts = dict(feature_map=feature_map, normalize=normalize, scale=K ** -0.5, backend="triton")

    def fwd():
        return fastml.causal_linear_attention(q, k, v, **opts)

    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def fwd_bwd():
        o = fastml.causal_linear_attention(*leaves, **opts)
        return torch.autograd.grad(o, leaves, do)

    with torch.no_grad():
        ms_f = triton.testing.do_bench(fwd)
    ms_fb = triton.testing.do_bench(fwd_bwd)
    gbytes = (3 * B * H * T * K + 2 * B * H * T * V) * q.element_size() / 1e9
    print(f"B{B} T{T} H{H} K{K} V{V} {str(dtype).split('.')[-1]} normalize={normalize!s:5} fmap={feature_map}: "
          f"fwd {ms_f:.3f} ms ({gbytes / ms_f * 1e3:.0f} GB/s)  fwd+bwd {ms_fb:.3f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feature-map", default="elu+1", choices=["none", "elu+1", "relu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("la_gpu_probe needs a CUDA device")
    fmap = None if args.feature_map == "none" else args.feature_map
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for shape in SHAPES:
        for normalize in (False, True):
            probe(*shape, normalize, fmap, getattr(torch, args.dtype))
    for name, kernel in (("fwd", linear_attention._fwd_kernel), ("dq", linear_attention_bwd._dq_kernel),
                         ("dkv", linear_attention_bwd._dkv_kernel)):
        for key, config in kernel.cache.items():
            print(f"{name} autotune {key[:3]} -> {config}")


if __name__ == "__main__":
    main()
