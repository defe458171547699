// CPU kernels of the Gaussian latent ops, fastml::gaussian_kl_{fwd,bwd} (schemas and semantics in
// fastml/ops/gaussian/schema.py; the noise is defined in fastml/ops/gaussian/reference.py).
//
// One element-wise pass with a per-sample reduction. The flattened latent [B, M] is cut into tasks of up to
// kChunk elements of one sample; each task walks its elements in blocks of kBlock (everything of a block stays in
// L1): it converts the block's inputs to the accumulation type, generates the block's noise from the element
// counters (no state, so any block can be generated on its own, in the forward or again in the backward), and
// runs the KL, the sample and the gradients as flat loops that the compiler vectorizes. Per-task partial sums of
// the KL are added per sample in a fixed order, so results do not depend on the thread count. The float path uses
// polynomial exp / log / sin / cos written so that loops over them vectorize (a libm call stops GCC from
// vectorizing), forced inline (a loop that calls an out-of-line function runs scalar); float64 uses the C
// library. The noise is used in place in the block's pair buffer, and the gradients of mu and logvar are written
// straight from the inputs, without copying them into scratch first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kBlock = 512;    // elements per inner block
constexpr int64_t kChunk = 16384;  // elements per parallel task

// The element helpers are forced inline: GCC otherwise keeps Math<float>::exp (called from several loops) out of
// line, and a loop that calls a function does not vectorize.
#define FASTML_GK_INLINE inline __attribute__((always_inline))

FASTML_GK_INLINE uint32_t noise_bits(uint32_t c, uint32_t k0, uint32_t k1) {
  return fastml::counter_mix(fastml::counter_mix(c ^ k0) + k1);
}

template <typename T>
FASTML_GK_INLINE T from_bits_i32(int32_t b) {
  T f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// sqrt(x) for x >= 0 as x / sqrt(x) from the classic bit-level estimate of 1 / sqrt(x) and three Newton steps
// (float precision); std::sqrt keeps a branch for errno that stops the loop from vectorizing. Gives 0 at 0.
FASTML_GK_INLINE float sqrt_nonneg(float x) {
  int32_t b;
  std::memcpy(&b, &x, 4);
  float y = from_bits_i32<float>(0x5f3759df - (b >> 1));
  const float h = 0.5f * x;
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  return x * y;
}

template <typename A>
struct Math;

// float: branch-free polynomials (selects compile to blends), so the loops that call them vectorize.
template <>
struct Math<float> {
  // exp over the whole float range: inf above log(FLT_MAX), 0 below the smallest subnormal, NaN passes.
  static FASTML_GK_INLINE float exp(float x) {
    constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
    const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
    const float y = xc * 1.44269504088896341f + kMagic;
    const float n = y - kMagic;
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t yb, mb;
    std::memcpy(&yb, &y, 4);
    std::memcpy(&mb, &kMagic, 4);
    const int32_t ni = yb - mb;
    const int32_t n1 = ni >> 1, n2 = ni - n1;  // 2^n as 2^n1 * 2^n2: both factors normal over the whole range
    float res = p * from_bits_i32<float>((n1 + 127) << 23) * from_bits_i32<float>((n2 + 127) << 23);
    res = x > 88.7228391f ? std::numeric_limits<float>::infinity() : res;
    res = x < -103.97f ? 0.0f : res;
    return res;
  }

  // e[0], e[1] of one pair from its two 32-bit words (Box-Muller, reference.py).
  static FASTML_GK_INLINE void pair(uint32_t h1, uint32_t h2, float& c, float& s) {
    // log u1 with u1 = m / 2^24, m = (h1 >> 8) + 1 in [1, 2^24] (exact in float).
    const float f = static_cast<float>(static_cast<int32_t>((h1 >> 8) + 1));
    int32_t b;
    std::memcpy(&b, &f, 4);
    int32_t e = (b >> 23) - 127;
    float x = from_bits_i32<float>((b & 0x7FFFFF) | 0x3F800000);
    const bool big = x > 1.41421356f;
    x = big ? x * 0.5f : x;
    e = big ? e + 1 : e;
    const float y = (x - 1.0f) / (x + 1.0f), y2 = y * y;
    float p = 1.0f / 9.0f;
    p = p * y2 + 1.0f / 7.0f;
    p = p * y2 + 1.0f / 5.0f;
    p = p * y2 + 1.0f / 3.0f;
    p = p * y2 + 1.0f;
    const float log_u1 = static_cast<float>(e - 24) * 0.693147180559945f + 2.0f * y * p;
    const float radius = sqrt_nonneg(-2.0f * log_u1);
    // sin / cos of 2 pi u2, u2 = k / 2^24: quadrant q = round(4 u2), a = 2 pi (u2 - q / 4) in [-pi/4, pi/4].
    constexpr float kMagic = 12582912.0f;
    const float u2 = static_cast<float>(static_cast<int32_t>(h2 >> 8)) * (1.0f / 16777216.0f);
    const float qf = (u2 * 4.0f + kMagic) - kMagic;
    const int32_t q = static_cast<int32_t>(qf) & 3;
    const float a = (u2 - qf * 0.25f) * 6.28318530717958648f, a2 = a * a;
    float sa = 1.0f / 362880.0f;
    sa = sa * a2 - 1.0f / 5040.0f;
    sa = sa * a2 + 1.0f / 120.0f;
    sa = sa * a2 - 1.0f / 6.0f;
    sa = (sa * a2 + 1.0f) * a;
    float ca = -1.0f / 3628800.0f;
    ca = ca * a2 + 1.0f / 40320.0f;
    ca = ca * a2 - 1.0f / 720.0f;
    ca = ca * a2 + 1.0f / 24.0f;
    ca = ca * a2 - 0.5f;
    ca = ca * a2 + 1.0f;
    const bool swap = (q & 1) != 0;
    const float c0 = swap ? sa : ca, s0 = swap ? ca : sa;
    const bool negc = (q == 1) | (q == 2), negs = q >= 2;  // no short-circuit: no branch in the vector loop
    c = radius * (negc ? -c0 : c0);
    s = radius * (negs ? -s0 : s0);
  }
};

template <>
struct Math<double> {
  static inline double exp(double x) { return std::exp(x); }
  static inline void pair(uint32_t h1, uint32_t h2, double& c, double& s) {
    const double u1 = static_cast<double>((h1 >> 8) + 1) * (1.0 / 16777216.0);
    const double u2 = static_cast<double>(h2 >> 8) * (1.0 / 16777216.0);
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double a = 6.283185307179586476925 * u2;
    c = radius * std::cos(a);
    s = radius * std::sin(a);
  }
};

// The noise of elements [lo, lo + n) (n <= kBlock), generated into pairs (scratch of kBlock + 2 elements);
// returns where element lo lies in it.
template <typename A>
const A* noise(int64_t lo, int64_t n, uint32_t k0, uint32_t k1, A* pairs) {
  const int64_t p0 = lo >> 1, p1 = (lo + n + 1) >> 1;
  const int64_t np = p1 - p0;
#pragma omp simd
  for (int64_t q = 0; q < np; ++q) {
    const uint32_t c = static_cast<uint32_t>(2 * (p0 + q));
    A cv, sv;
    Math<A>::pair(noise_bits(c, k0, k1), noise_bits(c + 1, k0, k1), cv, sv);
    pairs[2 * q] = cv;
    pairs[2 * q + 1] = sv;
  }
  return pairs + (lo - 2 * p0);
}

template <typename scalar_t, typename A>
inline const A* load(const scalar_t* src, int64_t n, A* buf) {
  if constexpr (std::is_same<scalar_t, A>::value) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// n elements of an optional prior tensor from element b0, in the accumulation type: zeros (the standard normal's
// mean and log-variance) when it is not given.
template <typename scalar_t, typename A>
inline const A* load_or_zero(const scalar_t* src, int64_t b0, int64_t n, A* buf) {
  if (src != nullptr) return load(src + b0, n, buf);
  for (int64_t i = 0; i < n; ++i) buf[i] = A(0);
  return buf;
}

template <typename scalar_t, typename A>
inline A* out_buf(scalar_t* dst, A* buf) {
  if constexpr (std::is_same<scalar_t, A>::value) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename A>
inline void store(scalar_t* dst, const A* buf, int64_t n) {
  if constexpr (!std::is_same<scalar_t, A>::value) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
  }
}

struct Args {
  int64_t B, M;
  bool has_pm, has_plv, residual, sample, elementwise;
  double temperature;
  uint32_t k0, k1;
};

template <typename A>
struct Scratch {
  A mu[kBlock], lv[kBlock], pm[kBlock], plv[kBlock], e[kBlock], pairs[kBlock + 4];
  A o1[kBlock], o2[kBlock], o3[kBlock], o4[kBlock], gk[kBlock], gz[kBlock];
};

template <typename A>
inline A zero_or(const A* p, int64_t i) {
  return p ? p[i] : A(0);
}

// Runs f(task, lo, hi) over tasks of one sample's elements each; returns the number of chunks per sample.
template <typename F>
int64_t for_chunks(const Args& a, F f) {
  const int64_t nch = a.M > 0 ? (a.M + kChunk - 1) / kChunk : 0;
  at::parallel_for(0, a.B * nch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nch, c = t % nch;
      const int64_t lo = b * a.M + c * kChunk;
      f(t, b, lo, b * a.M + std::min(a.M, (c + 1) * kChunk));
    }
  });
  return nch;
}

template <typename scalar_t>
void fwd_impl(const at::Tensor& mu, const at::Tensor& lv, const at::Tensor* pm, const at::Tensor* plv, const Args& a,
              at::Tensor& z, at::Tensor& kl) {
  using A = at::opmath_type<scalar_t>;
  const scalar_t* mup = mu.data_ptr<scalar_t>();
  const scalar_t* lvp = lv.data_ptr<scalar_t>();
  const scalar_t* pmp = pm ? pm->data_ptr<scalar_t>() : nullptr;
  const scalar_t* plvp = plv ? plv->data_ptr<scalar_t>() : nullptr;
  scalar_t* zp = a.sample ? z.data_ptr<scalar_t>() : nullptr;
  scalar_t* klp = a.elementwise ? kl.data_ptr<scalar_t>() : nullptr;
  const int64_t nch = a.M > 0 ? (a.M + kChunk - 1) / kChunk : 0;
  std::vector<A> partial(static_cast<size_t>(std::max<int64_t>(a.B * nch, 1)), A(0));
  const A T = static_cast<A>(a.temperature);
  const bool prior = pmp || plvp;
  for_chunks(a, [&](int64_t task, int64_t, int64_t lo, int64_t hi) {
    Scratch<A> s;
    A total = 0;
    for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
      const int64_t n = std::min(kBlock, hi - b0);
      const A* m = load(mup + b0, n, s.mu);
      const A* l = load(lvp + b0, n, s.lv);
      const A* e = nullptr;
      if (a.sample) {
        e = noise<A>(b0, n, a.k0, a.k1, s.pairs);
      }
      A* zb = a.sample ? out_buf(zp + b0, s.o1) : nullptr;
      A* kb = s.o2;
      if (!prior) {
        if (a.sample) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const A sd = Math<A>::exp(A(0.5) * l[i]);
            kb[i] = A(0.5) * (m[i] * m[i] + sd * sd - A(1) - l[i]);
            zb[i] = m[i] + T * sd * e[i];
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) kb[i] = A(0.5) * (m[i] * m[i] + Math<A>::exp(l[i]) - A(1) - l[i]);
        }
      } else {
        const A* pmb = load_or_zero(pmp, b0, n, s.pm);
        const A* plb = load_or_zero(plvp, b0, n, s.plv);
        auto body = [&](auto residual) {
          constexpr bool res = decltype(residual)::value;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const A ip = Math<A>::exp(-plb[i]);
            const A d = res ? m[i] : m[i] - pmb[i];
            const A r = res ? l[i] : l[i] - plb[i];
            kb[i] = A(0.5) * (d * d * ip + Math<A>::exp(r) - A(1) - r);
          }
          if (a.sample) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              const A mean = res ? pmb[i] + m[i] : m[i];
              const A lvq = res ? plb[i] + l[i] : l[i];
              zb[i] = mean + T * Math<A>::exp(A(0.5) * lvq) * e[i];
            }
          }
        };
        if (a.residual) {
          body(std::true_type{});
        } else {
          body(std::false_type{});
        }
      }
      if (a.sample) store(zp + b0, zb, n);
      if (a.elementwise) {
        for (int64_t i = 0; i < n; ++i) klp[b0 + i] = static_cast<scalar_t>(kb[i]);
      } else {
        A bs = 0;
#pragma omp simd reduction(+ : bs)
        for (int64_t i = 0; i < n; ++i) bs += kb[i];
        total += bs;
      }
    }
    partial[task] = total;
  });
  if (!a.elementwise) {
    A* out = kl.data_ptr<A>();
    for (int64_t b = 0; b < a.B; ++b) {
      A acc = 0;
      for (int64_t c = 0; c < nch; ++c) acc += partial[b * nch + c];
      out[b] = acc;
    }
  }
}

template <typename scalar_t>
void bwd_impl(const at::Tensor* gz_t, const at::Tensor& gk_t, const at::Tensor& mu, const at::Tensor& lv,
              const at::Tensor* pm, const at::Tensor* plv, const Args& a, at::Tensor& dmu, at::Tensor& dlv,
              at::Tensor& dpm, at::Tensor& dplv) {
  using A = at::opmath_type<scalar_t>;
  const scalar_t* mup = mu.data_ptr<scalar_t>();
  const scalar_t* lvp = lv.data_ptr<scalar_t>();
  const scalar_t* pmp = pm ? pm->data_ptr<scalar_t>() : nullptr;
  const scalar_t* plvp = plv ? plv->data_ptr<scalar_t>() : nullptr;
  const scalar_t* gzp = gz_t ? gz_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* gke = a.elementwise ? gk_t.data_ptr<scalar_t>() : nullptr;
  const A* gks = a.elementwise ? nullptr : gk_t.data_ptr<A>();
  scalar_t* dmup = dmu.data_ptr<scalar_t>();
  scalar_t* dlvp = dlv.data_ptr<scalar_t>();
  scalar_t* dpmp = pm ? dpm.data_ptr<scalar_t>() : nullptr;
  scalar_t* dplvp = plv ? dplv.data_ptr<scalar_t>() : nullptr;
  const A T = static_cast<A>(a.temperature);
  const bool prior = pmp || plvp, with_z = gzp != nullptr;
  for_chunks(a, [&](int64_t, int64_t b, int64_t lo, int64_t hi) {
    Scratch<A> s;
    for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
      const int64_t n = std::min(kBlock, hi - b0);
      const A* m = load(mup + b0, n, s.mu);
      const A* l = load(lvp + b0, n, s.lv);
      const A* gk = s.gk;
      if (gke) {
        gk = load(gke + b0, n, s.gk);
      } else {
        const A g = gks[b];
        for (int64_t i = 0; i < n; ++i) s.gk[i] = g;
      }
      // Without a gradient for z, e and gz are zero: the z terms vanish.
      const A* e = s.e;
      const A* gz = s.gz;
      if (with_z) {
        e = noise<A>(b0, n, a.k0, a.k1, s.pairs);
        gz = load(gzp + b0, n, s.gz);
      }
      A* o_mu = out_buf(dmup + b0, s.o1);
      A* o_lv = out_buf(dlvp + b0, s.o2);
      if (!prior) {
        if (with_z) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const A sd = Math<A>::exp(A(0.5) * l[i]);
            o_mu[i] = gk[i] * m[i] + gz[i];
            o_lv[i] = gk[i] * A(0.5) * (sd * sd - A(1)) + gz[i] * A(0.5) * T * sd * e[i];
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            o_mu[i] = gk[i] * m[i];
            o_lv[i] = gk[i] * A(0.5) * (Math<A>::exp(l[i]) - A(1));
          }
        }
      } else {
        if (!with_z) {
          for (int64_t i = 0; i < n; ++i) s.e[i] = s.gz[i] = A(0);
        }
        const A* pmb = load_or_zero(pmp, b0, n, s.pm);
        const A* plb = load_or_zero(plvp, b0, n, s.plv);
        A* o_pm = dpmp ? out_buf(dpmp + b0, s.o3) : s.o3;
        A* o_plv = dplvp ? out_buf(dplvp + b0, s.o4) : s.o4;
        auto body = [&](auto residual) {
          constexpr bool res = decltype(residual)::value;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const A ip = Math<A>::exp(-plb[i]);
            const A d = res ? m[i] : m[i] - pmb[i];
            const A r = res ? l[i] : l[i] - plb[i];
            const A dd = d * ip;
            const A dr = A(0.5) * (Math<A>::exp(r) - A(1));
            const A zs = gz[i] * A(0.5) * T * Math<A>::exp(A(0.5) * (res ? l[i] + plb[i] : l[i])) * e[i];
            o_mu[i] = gk[i] * dd + gz[i];
            o_lv[i] = gk[i] * dr + zs;
            o_pm[i] = res ? gz[i] : -gk[i] * dd;
            o_plv[i] = (res ? zs : -gk[i] * dr) - gk[i] * A(0.5) * d * dd;
          }
        };
        if (a.residual) {
          body(std::true_type{});
        } else {
          body(std::false_type{});
        }
        if (dpmp) store(dpmp + b0, o_pm, n);
        if (dplvp) store(dplvp + b0, o_plv, n);
      }
      store(dmup + b0, o_mu, n);
      store(dlvp + b0, o_lv, n);
    }
  });
}

Args make_args(const at::Tensor& mu, const at::Tensor& lv, const c10::optional<at::Tensor>& pm,
               const c10::optional<at::Tensor>& plv, const c10::optional<at::Tensor>& seed, bool residual,
               double temperature, bool elementwise) {
  TORCH_CHECK(mu.dim() >= 1, "mu must have a batch dimension (at least 1-D)");
  TORCH_CHECK(mu.is_contiguous() && lv.is_contiguous(), "mu and logvar must be contiguous");
  TORCH_CHECK(lv.sizes() == mu.sizes() && lv.scalar_type() == mu.scalar_type(),
              "logvar must have mu's shape and dtype");
  for (const auto* t : {&pm, &plv}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->sizes() == mu.sizes() && (*t)->scalar_type() == mu.scalar_type() && (*t)->is_contiguous(),
                  "the prior's mean and log variance must be contiguous, with mu's shape and dtype");
    }
  }
  Args a;
  a.B = mu.size(0);
  a.M = a.B > 0 ? mu.numel() / a.B : 0;
  a.has_pm = pm.has_value();
  a.has_plv = plv.has_value();
  a.residual = residual;
  a.sample = seed.has_value();
  a.elementwise = elementwise;
  a.temperature = temperature;
  a.k0 = a.k1 = 0;
  if (a.sample) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
                "seed must be an int64 tensor with one element");
    TORCH_CHECK(mu.numel() <= (int64_t(1) << 32), "the noise counter is 32 bits wide: at most 2^32 elements");
    const uint64_t s = static_cast<uint64_t>(seed->item<int64_t>());
    a.k0 = static_cast<uint32_t>(s & 0xFFFFFFFFu);
    a.k1 = static_cast<uint32_t>(s >> 32);
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_fwd_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                       const c10::optional<at::Tensor>& prior_mu,
                                                       const c10::optional<at::Tensor>& prior_logvar,
                                                       const c10::optional<at::Tensor>& seed, bool residual,
                                                       double temperature, bool elementwise) {
  const Args a = make_args(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise);
  auto z = a.sample ? at::empty_like(mu) : mu.new_empty({0});
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto kl = elementwise ? at::empty_like(mu) : at::empty({a.B}, mu.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_kl_fwd", [&] {
    fwd_impl<scalar_t>(mu, logvar, prior_mu.has_value() ? &*prior_mu : nullptr,
                       prior_logvar.has_value() ? &*prior_logvar : nullptr, a, z, kl);
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_bwd_cpu(
    const c10::optional<at::Tensor>& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar,
    const c10::optional<at::Tensor>& prior_mu, const c10::optional<at::Tensor>& prior_logvar,
    const c10::optional<at::Tensor>& seed, bool residual, double temperature, bool elementwise) {
  const Args a = make_args(mu, logvar, prior_mu, prior_logvar, seed, residual, temperature, elementwise);
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (elementwise) {
    TORCH_CHECK(grad_kl.sizes() == mu.sizes() && grad_kl.scalar_type() == mu.scalar_type() && grad_kl.is_contiguous(),
                "grad_kl must be contiguous with mu's shape and dtype");
  } else {
    TORCH_CHECK(grad_kl.dim() == 1 && grad_kl.size(0) == a.B && grad_kl.scalar_type() == acc &&
                    grad_kl.is_contiguous(),
                "grad_kl must be a contiguous [B] tensor of the accumulation dtype");
  }
  if (grad_z.has_value()) {
    TORCH_CHECK(a.sample, "grad_z needs the seed of the forward's noise");
    TORCH_CHECK(grad_z->sizes() == mu.sizes() && grad_z->scalar_type() == mu.scalar_type() && grad_z->is_contiguous(),
                "grad_z must be contiguous with mu's shape and dtype");
  }
  auto dmu = at::empty_like(mu), dlv = at::empty_like(mu);
  auto dpm = prior_mu.has_value() ? at::empty_like(mu) : mu.new_empty({0});
  auto dplv = prior_logvar.has_value() ? at::empty_like(mu) : mu.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gaussian_kl_bwd", [&] {
    bwd_impl<scalar_t>(grad_z.has_value() ? &*grad_z : nullptr, grad_kl, mu, logvar,
                       prior_mu.has_value() ? &*prior_mu : nullptr, prior_logvar.has_value() ? &*prior_logvar : nullptr,
                       a, dmu, dlv, dpm, dplv);
  });
  return {dmu, dlv, dpm, dplv};
}

}  // namespace

#undef FASTML_GK_INLINE

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("gaussian_kl_fwd", &gaussian_kl_fwd_cpu);
  m.impl("gaussian_kl_bwd", &gaussian_kl_bwd_cpu);
}
