// The chunked scan behind every causal-linear-attention pass. One generic form,
//   out_r = Qa_r S + s * sum_{c masked} (Qa_r . Ka_c) Vb_c,   S += s * Ka^T Vb   (per chunk, in scan order)
// serves the forward and the three backward passes with different operands (see linear_attention_bwd.cu):
//   fwd: Qa = q', Ka = k', Vb = v,            S = kv,        forward scan (mask c <= r), plus z and den
//   dq : Qa = [do, -do.o], Ka = [v, 1], Vb = k',  S = [kv, z]^T, forward scan; dq' = out / den
//   dk : Qa = [v, 1], Ka = [do, -do.o], Vb = q'/den, S = [dkv, dz]^T, reverse scan (mask c >= r)
//   dv : Qa = k', Ka = q', Vb = do/den,           S = dkv,       reverse scan
// A block owns one (sequence, head, tile of BN output columns) and walks its chunks of C tokens, keeping the state
// in shared memory in the accumulation type. 16-bit inputs run the products on tensor cores (block_gemm).
#pragma once

#include "common.cuh"
#include "linear_attention.h"

namespace fastml_cuda {

enum class Pass { fwd, dq, dk, dv };

template <class T> struct Tile;  // chunk length C, output tile BN, row padding PAD (elements of T), PADA (of acc)
template <> struct Tile<__half> { static constexpr int C = 64, BN = 64, PAD = 8, PADA = 4; };
template <> struct Tile<__nv_bfloat16> { static constexpr int C = 64, BN = 64, PAD = 8, PADA = 4; };
template <> struct Tile<float> { static constexpr int C = 32, BN = 64, PAD = 1, PADA = 1; };
template <> struct Tile<double> { static constexpr int C = 16, BN = 32, PAD = 1, PADA = 1; };

constexpr int kScanThreads = 256;

// Byte offsets of the shared-memory regions for a contraction width DK (a multiple of 16).
struct ScanLayout {
  int ldq, ldv, lds, lde, lda, ldae;
  int64_t qa, ka, vb, sf, se, af, ae, of, z, den, rinv, rdd, total;
};

template <class T> __host__ __device__ inline ScanLayout scan_layout(int DK) {
  using A = acc_t<T>;
  using Cfg = Tile<T>;
  constexpr int C = Cfg::C, BN = Cfg::BN;
  constexpr bool half = is_half_like<T>;
  ScanLayout L{};
  L.ldq = DK + Cfg::PAD;
  L.ldv = BN + Cfg::PAD;
  L.lds = BN + Cfg::PADA;
  L.lda = C + Cfg::PADA;
  L.lde = half ? L.ldv : L.lds;
  L.ldae = half ? C + Cfg::PAD : L.lda;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off = round_up(off + bytes, 128);
    return at;
  };
  L.qa = take(int64_t(C) * L.ldq * sizeof(T));
  L.ka = take(int64_t(C) * L.ldq * sizeof(T));
  L.vb = take(int64_t(C) * L.ldv * sizeof(T));
  L.sf = take(int64_t(DK) * L.lds * sizeof(A));
  L.se = half ? take(int64_t(DK) * L.lde * sizeof(T)) : L.sf;
  L.af = take(int64_t(C) * L.lda * sizeof(A));
  L.ae = half ? take(int64_t(C) * L.ldae * sizeof(T)) : L.af;
  // 16-bit: the output tile reuses the fp32 score tile, dead once converted (BN <= C).
  L.of = half ? L.af : take(int64_t(C) * L.lds * sizeof(A));
  L.z = take(int64_t(DK) * sizeof(A));
  L.den = take(int64_t(C) * sizeof(A));
  L.rinv = take(int64_t(C) * sizeof(A));
  L.rdd = take(int64_t(C) * sizeof(A));
  L.total = off;
  return L;
}
static_assert(Tile<__half>::BN <= Tile<__half>::C, "the output tile reuses the score tile");

// Contraction width (before padding) and output width of a pass.
__host__ __device__ inline int64_t pass_kdim(Pass p, int64_t K, int64_t V) {
  return (p == Pass::fwd || p == Pass::dv) ? K : V + 1;
}
__host__ __device__ inline int64_t pass_nout(Pass p, int64_t K, int64_t V) {
  return (p == Pass::fwd || p == Pass::dv) ? V : K;
}

template <class T, class F> __device__ __forceinline__ void fill_tile(T* dst, int ld, int R, int W, F f) {
  for (int idx = threadIdx.x; idx < R * W; idx += blockDim.x) {
    const int r = idx / W, c = idx % W;
    dst[r * ld + c] = from_acc<T>(f(r, c));
  }
}

template <class T, Pass P>
__global__ void __launch_bounds__(kScanThreads) la_scan_kernel(const LinearAttentionArgs a, const int DK) {
  using A = acc_t<T>;
  using Cfg = Tile<T>;
  constexpr int C = Cfg::C, BN = Cfg::BN;
  constexpr bool kHalf = is_half_like<T>;
  constexpr bool kReverse = P == Pass::dk || P == Pass::dv;
  extern __shared__ __align__(128) unsigned char smem[];
  const ScanLayout L = scan_layout<T>(DK);
  T* Qa = reinterpret_cast<T*>(smem + L.qa);
  T* Ka = reinterpret_cast<T*>(smem + L.ka);
  T* Vb = reinterpret_cast<T*>(smem + L.vb);
  A* Sf = reinterpret_cast<A*>(smem + L.sf);
  T* Se = reinterpret_cast<T*>(smem + L.se);
  A* Af = reinterpret_cast<A*>(smem + L.af);
  T* Ae = reinterpret_cast<T*>(smem + L.ae);
  A* Of = reinterpret_cast<A*>(smem + L.of);
  A* zs = reinterpret_cast<A*>(smem + L.z);
  A* dens = reinterpret_cast<A*>(smem + L.den);
  A* rinv = reinterpret_cast<A*>(smem + L.rinv);
  A* rdd = reinterpret_cast<A*>(smem + L.rdd);

  const int64_t K = a.K, V = a.V, H = a.H;
  const int64_t seq = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t sidx = seq * H + h;  // index of this sequence's state
  const int col0 = blockIdx.y * BN;
  int64_t bos = 0, eos = a.T, b = seq;
  if (a.cu_seqlens != nullptr) {
    // Clamped to 0 <= bos <= eos <= T: the binding checks the values on the device without waiting for the
    // result, so a bad tensor must not make this kernel read or write outside q, k, v and the outputs meanwhile.
    bos = min(max(a.cu_seqlens[seq], int64_t(0)), a.T);
    eos = min(max(a.cu_seqlens[seq + 1], bos), a.T);
    b = 0;
  }
  const int64_t row0 = (b * H + h) * a.T;  // row of token 0 of (b, h) in the [B*H*T, D] views
  const int kdim = int(pass_kdim(P, K, V));
  const int nout = int(pass_nout(P, K, V));
  const A scale = A(a.scale), eps = A(a.eps);
  const int fm = a.feature_map;
  const bool norm = a.normalize;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* go = static_cast<const T*>(a.grad_o);
  const T* o = static_cast<const T*>(a.o);
  const A* den_in = static_cast<const A*>(a.den);

  // The initial state: the forward's kv0 (and z0), or the gradient of the final state for the reverse passes,
  // transposed with the z row appended for dq and dk.
  {
    const A* s0 = static_cast<const A*>(P == Pass::fwd || P == Pass::dq ? a.kv0 : a.grad_kv);
    const A* z0 = static_cast<const A*>(P == Pass::fwd || P == Pass::dq ? a.z0 : a.grad_z);
    for (int idx = threadIdx.x; idx < DK * BN; idx += blockDim.x) {
      const int i = idx / BN, j = idx % BN, col = col0 + j;
      A x = A(0);
      if (col < nout && i < kdim) {
        if (P == Pass::fwd || P == Pass::dv) {
          if (s0 != nullptr) x = s0[(sidx * K + i) * V + col];
        } else if (i < V) {
          if (s0 != nullptr) x = s0[(sidx * K + col) * V + i];
        } else if (z0 != nullptr) {
          x = z0[sidx * K + col];
        }
      }
      Sf[i * L.lds + j] = x;
    }
    if (P == Pass::fwd) {
      for (int i = threadIdx.x; i < DK; i += blockDim.x) zs[i] = (z0 != nullptr && i < K) ? z0[sidx * K + i] : A(0);
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  const int64_t nchunks = (eos - bos + C - 1) / C;
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t t0 = bos + (kReverse ? nchunks - 1 - ci : ci) * C;
    const int rows = int(eos - t0 < C ? eos - t0 : C);
    // Backward row factors: rinv = 1/den, rdd = -(do . o) (0 without normalization); Vb rows carry rinv scaled by
    // a power of two per chunk (exact) so that tiny 1/den values keep their precision in 16-bit operands.
    A vscale = A(1);
    if constexpr (P != Pass::fwd) {
      for (int r = warp; r < C; r += nwarps) {
        A ri = A(0), dd = A(0);
        if (r < rows) {
          const int64_t row = row0 + t0 + r;
          ri = norm ? A(1) / den_in[row] : A(1);
          if (norm && P != Pass::dv) {
            A part = A(0);
            for (int64_t c = lane; c < V; c += 32) part += to_acc(go[row * V + c]) * to_acc(o[row * V + c]);
            dd = -warp_sum(part);
          }
        }
        if (lane == 0) {
          rinv[r] = ri;
          rdd[r] = dd;
        }
      }
      __syncthreads();
      if (kReverse) {
        A m = A(0);
        for (int r = 0; r < rows; ++r) m = fmax(m, fabs(rinv[r]));
        if (m > A(0) && isfinite(m)) {
          int e = 0;
          frexp(m, &e);
          vscale = ldexp(A(1), e);
        }
      }
    }
    const A vinv = A(1) / vscale;

    // Operands of this chunk, zero beyond the sequence and the widths.
    auto qmap = [&](int r, int c) {
      return (r < rows && c < K) ? scale * feature(to_acc(q[(row0 + t0 + r) * K + c]), fm) : A(0);
    };
    auto kmap = [&](int r, int c) {
      return (r < rows && c < K) ? feature(to_acc(k[(row0 + t0 + r) * K + c]), fm) : A(0);
    };
    auto vone = [&](int r, int c) {  // [v, 1]
      if (r >= rows || c > V) return A(0);
      return c < V ? to_acc(v[(row0 + t0 + r) * V + c]) : A(1);
    };
    auto dodd = [&](int r, int c) {  // [do, -do.o]
      if (r >= rows || c > V) return A(0);
      return c < V ? to_acc(go[(row0 + t0 + r) * V + c]) : rdd[r];
    };
    if constexpr (P == Pass::fwd) {
      fill_tile(Qa, L.ldq, C, DK, qmap);
      fill_tile(Ka, L.ldq, C, DK, kmap);
      fill_tile(Vb, L.ldv, C, BN, [&](int r, int c) {
        return (r < rows && col0 + c < V) ? to_acc(v[(row0 + t0 + r) * V + col0 + c]) : A(0);
      });
    } else if constexpr (P == Pass::dq) {
      fill_tile(Qa, L.ldq, C, DK, dodd);
      fill_tile(Ka, L.ldq, C, DK, vone);
      fill_tile(Vb, L.ldv, C, BN, [&](int r, int c) { return col0 + c < K ? kmap(r, col0 + c) : A(0); });
    } else if constexpr (P == Pass::dk) {
      fill_tile(Qa, L.ldq, C, DK, vone);
      fill_tile(Ka, L.ldq, C, DK, dodd);
      fill_tile(Vb, L.ldv, C, BN,
                [&](int r, int c) { return col0 + c < K ? qmap(r, col0 + c) * rinv[r] * vinv : A(0); });
    } else {
      fill_tile(Qa, L.ldq, C, DK, kmap);
      fill_tile(Ka, L.ldq, C, DK, qmap);
      fill_tile(Vb, L.ldv, C, BN, [&](int r, int c) {
        return (r < rows && col0 + c < V) ? to_acc(go[(row0 + t0 + r) * V + col0 + c]) * rinv[r] * vinv : A(0);
      });
    }
    if constexpr (kHalf) {
      for (int idx = threadIdx.x; idx < DK * BN; idx += blockDim.x) {
        const int i = idx / BN, j = idx % BN;
        Se[i * L.lde + j] = from_acc<T>(Sf[i * L.lds + j]);
      }
    }
    __syncthreads();

    // Scores Qa Ka^T, masked to the causal (or, in reverse, anti-causal) triangle.
    block_gemm<T, false, true, false, false>(Af, L.lda, C, C, false, Qa, L.ldq, Ka, L.ldq, DK, nullptr, 0,
                                             nullptr, 0, 0, A(1));
    __syncthreads();
    if constexpr (P == Pass::fwd) {
      // den_r = q'_r . z_r + eps, z_r including token r: the state's z plus the masked row sum of the scores.
      for (int r = warp; r < C; r += nwarps) {
        A part = A(0);
        for (int c = lane; c <= r; c += 32) part += Af[r * L.lda + c];
        for (int i = lane; i < kdim; i += 32) part += to_acc(Qa[r * L.ldq + i]) * zs[i];
        part = warp_sum(part);
        if (lane == 0) dens[r] = part + eps;
      }
    }
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
      const int r = idx / C, c = idx % C;
      const bool keep = kReverse ? c >= r : c <= r;
      if constexpr (kHalf) {
        Ae[r * L.ldae + c] = from_acc<T>(keep ? Af[r * L.lda + c] : 0.0f);
      } else if (!keep) {
        Af[r * L.lda + c] = A(0);
      }
    }
    __syncthreads();

    block_gemm<T, false, false, false, false>(Of, L.lds, C, BN, false, Qa, L.ldq, Se, L.lde, DK, Ae, L.ldae, Vb,
                                              L.ldv, C, vscale);
    __syncthreads();

    // Results of the chunk, then the state update (independent regions, no barrier between).
    for (int idx = threadIdx.x; idx < C * BN; idx += blockDim.x) {
      const int r = idx / BN, j = idx % BN, col = col0 + j;
      if (r >= rows || col >= nout) continue;
      const int64_t row = row0 + t0 + r;
      const A x = Of[r * L.lds + j];
      if constexpr (P == Pass::fwd) {
        static_cast<T*>(a.out_o)[row * V + col] = from_acc<T>(norm ? x / dens[r] : x);
      } else if constexpr (P == Pass::dq) {
        static_cast<T*>(a.dq)[row * K + col] =
            from_acc<T>(x * rinv[r] * scale * feature_grad(to_acc(q[row * K + col]), fm));
      } else if constexpr (P == Pass::dk) {
        static_cast<T*>(a.dk)[row * K + col] = from_acc<T>(x * feature_grad(to_acc(k[row * K + col]), fm));
      } else {
        static_cast<T*>(a.dv)[row * V + col] = from_acc<T>(x);
      }
    }
    if (P == Pass::fwd && blockIdx.y == 0) {
      for (int r = threadIdx.x; r < rows; r += blockDim.x) static_cast<A*>(a.out_den)[row0 + t0 + r] = dens[r];
    }
    block_gemm<T, false, false, true, false>(Sf, L.lds, DK, BN, true, nullptr, 0, nullptr, 0, 0, Ka, L.ldq, Vb,
                                             L.ldv, C, vscale);
    if constexpr (P == Pass::fwd) {
      for (int i = threadIdx.x; i < kdim; i += blockDim.x) {
        A s = A(0);
        for (int r = 0; r < rows; ++r) s += to_acc(Ka[r * L.ldq + i]);
        zs[i] += s;
      }
    }
    __syncthreads();
  }

  // The final state: kv and z after the last token (fwd), dkv0 (dv), dz0 (dk, the appended row).
  if constexpr (P == Pass::fwd || P == Pass::dv) {
    A* dst = static_cast<A*>(P == Pass::fwd ? a.out_kv : a.dkv0);
    for (int idx = threadIdx.x; idx < kdim * BN; idx += blockDim.x) {
      const int i = idx / BN, j = idx % BN;
      if (col0 + j < V) dst[(sidx * K + i) * V + col0 + j] = Sf[i * L.lds + j];
    }
    if (P == Pass::fwd && blockIdx.y == 0) {
      for (int i = threadIdx.x; i < K; i += blockDim.x) static_cast<A*>(a.out_z)[sidx * K + i] = zs[i];
    }
  } else if constexpr (P == Pass::dk) {
    for (int j = threadIdx.x; j < BN; j += blockDim.x) {
      if (col0 + j < K) static_cast<A*>(a.dz0)[sidx * K + col0 + j] = Sf[V * L.lds + j];
    }
  }
}

// Launches one pass over a grid of (sequence x head, output tiles), raising the shared-memory limit as needed.
template <class T, Pass P> cudaError_t launch_scan(const LinearAttentionArgs& a, cudaStream_t stream) {
  if (a.N == 0 || a.H == 0) return cudaSuccess;
  const int DK = int(round_up(pass_kdim(P, a.K, a.V), 16));
  const int64_t bytes = scan_layout<T>(DK).total;
  auto kernel = la_scan_kernel<T, P>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  // At least one tile, so that a zero output width still writes z and den. Sequences x heads on axis x (the large
  // count), output tiles (at most kMaxHeadDim / BN + 1) on y.
  const int64_t tiles = (pass_nout(P, a.K, a.V) + Tile<T>::BN - 1) / Tile<T>::BN;
  if (a.N * a.H > kMaxGridX || tiles > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(a.N * a.H), unsigned(tiles > 0 ? tiles : 1));
  kernel<<<grid, kScanThreads, bytes, stream>>>(a, DK);
  return cudaGetLastError();
}

}  // namespace fastml_cuda
