// CPU kernels of causal linear attention: fastml::linear_attention_{fwd,bwd,step} (schemas in csrc/fastml.cpp,
// maths in fastml/ops/linear_attention/reference.py and README.md).
//
// Design. Every pass, forward and backward, is the same recurrence over a [rows x cols] state M:
//     for each token t (in order, or reversed):   M += a_t^T b_t;   out_t += c_t M
// forward:  M = S   (a = k', b = v,  c = q')   -> out = q'_t S_t, the numerator of o_t
// dq:       M = S^T (a = v,  b = k', c = dn)   -> out = dn_t S_t^T = dq'_t
// dv:       M = dS  (a = q', b = dn, c = k'),  reversed, M_0 = grad_kv -> out = dS_t^T k'_t = dv_t
// dk:       M = dS^T (a = dn, b = q', c = v),  reversed, M_0 = grad_kv^T -> out = dS_t v_t = dk'_t
// run token by token it costs exactly the 4*T*K*V flops of the maths per pass (a chunked form costs ~1.5-2x),
// and it is fast when an R x W tile of M lives in vector registers for a whole block of tokens: each token then
// costs 2R register multiply-adds, each with one broadcast operand from L1 (scan_block). The normalizer is the
// same recurrence with a ones column appended to v, done separately as O(K) work per token (z, den, dd).
// Work is split over (sequence, head) units with at::parallel_for; each unit walks its tokens in blocks of
// kBlockT, converting them once (dtype, feature map, scale, zero padding of K and V to whole tiles) into
// per-thread scratch. Nothing of size T*K*V is ever stored: the backward rescans the states.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common.h"
#include "cpu/linear_attention_kernels.h"

namespace fastml {
namespace {

using at::Tensor;
using namespace la_cpu;

// Sizes and options of one call, and where each (sequence, head) unit's tokens are.
struct Problem {
  int64_t H, T, K, V, Kp, Vp, units;
  int64_t fm;
  bool normalize;
  double eps, scale;
  const int64_t* cu;  // cu_seqlens, or nullptr: sequence n is batch row n

  // First row (in the [B*H*T] rows of q, k, v, o) and length of unit u = n * H + h.
  void span(int64_t u, int64_t* row0, int64_t* len) const {
    const int64_t n = u / H, h = u % H;
    if (cu != nullptr) {
      *row0 = h * T + cu[n];
      *len = cu[n + 1] - cu[n];
    } else {
      *row0 = u * T;
      *len = T;
    }
  }
};

template <typename scalar_t>
void forward_kernel(const Problem& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    const at::opmath_type<scalar_t>* kv0, const at::opmath_type<scalar_t>* z0, scalar_t* o,
                    at::opmath_type<scalar_t>* kv, at::opmath_type<scalar_t>* z, at::opmath_type<scalar_t>* den) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  at::parallel_for(0, p.units, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<acc_t> buf(2 * kBlockT * (Kp + Vp) + Kp * Vp + Kp + kBlockT);
    acc_t* qf = buf.data();
    acc_t* kf = qf + kBlockT * Kp;
    acc_t* vf = kf + kBlockT * Kp;
    acc_t* num = vf + kBlockT * Vp;
    acc_t* S = num + kBlockT * Vp;
    acc_t* zs = S + Kp * Vp;
    acc_t* d = zs + Kp;
    for (int64_t u = begin; u < end; ++u) {
      int64_t row0, len;
      p.span(u, &row0, &len);
      load_state(kv0, u, K, V, S, Vp, Kp * Vp, false);
      load_vector(z0, u, K, zs, Kp);
      for (int64_t t0 = 0; t0 < len; t0 += kBlockT) {
        const int64_t nb = std::min(kBlockT, len - t0), row = row0 + t0;
        const acc_t* qr = rows_view(q + row * K, nb, K, qf, Kp, p.fm, static_cast<acc_t>(p.scale));
        const acc_t* kr = rows_view(k + row * K, nb, K, kf, Kp, p.fm, acc_t(1));
        const acc_t* vr = rows_view(v + row * V, nb, V, vf, Vp, kIdentity, acc_t(1));
        for (int64_t t = 0; t < nb; ++t) {
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < Kp; ++i) {
            zs[i] += kr[t * Kp + i];
            dot += qr[t * Kp + i] * zs[i];
          }
          d[t] = dot + static_cast<acc_t>(p.eps);
          den[row + t] = d[t];
        }
        acc_t* out = output_rows(o + row * V, V, num, Vp, p.normalize);
        scan(S, kr, qr, Kp, vr, out, Vp, nb, false);
        if (out == reinterpret_cast<acc_t*>(o + row * V)) continue;
        for (int64_t t = 0; t < nb; ++t) {
          const acc_t r = p.normalize ? acc_t(1) / d[t] : acc_t(1);
          scalar_t* ot = o + (row + t) * V;
#pragma omp simd
          for (int64_t j = 0; j < V; ++j) ot[j] = static_cast<scalar_t>(num[t * Vp + j] * r);
        }
      }
      store_state(S, Vp, kv + u * K * V, K, V);
      std::copy(zs, zs + K, z + u * K);
    }
  });
}

// Backward scratch for one block, and the rows the scans read (scratch or the input tensors, see rows_view).
template <typename acc_t>
struct BlockScratch {
  acc_t *qf, *kf, *vf, *dn, *dd;
};
template <typename acc_t>
struct BlockRows {
  const acc_t *q, *k, *v, *dn;
};

// Block [row, row + nb) for the backward: q' (if with_q), k', v, dn = do / den and dd = -(do . o) / den (with
// normalize; else dn = do and dd = 0).
template <typename scalar_t, typename acc_t>
BlockRows<acc_t> load_backward_block(const Problem& p, int64_t row, int64_t nb, const scalar_t* q,
                                     const scalar_t* k, const scalar_t* v, const scalar_t* go, const scalar_t* o,
                                     const acc_t* den, const BlockScratch<acc_t>& s, bool with_q) {
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  BlockRows<acc_t> r;
  r.q = with_q ? rows_view(q + row * K, nb, K, s.qf, Kp, p.fm, static_cast<acc_t>(p.scale)) : nullptr;
  r.k = rows_view(k + row * K, nb, K, s.kf, Kp, p.fm, acc_t(1));
  r.v = rows_view(v + row * V, nb, V, s.vf, Vp, kIdentity, acc_t(1));
  if (!p.normalize) {
    std::fill(s.dd, s.dd + nb, acc_t(0));
    r.dn = rows_view(go + row * V, nb, V, s.dn, Vp, kIdentity, acc_t(1));
    return r;
  }
  load_rows(go + row * V, nb, V, s.dn, Vp, kIdentity, acc_t(1));
  for (int64_t t = 0; t < nb; ++t) {
    const acc_t inv = acc_t(1) / den[row + t];
    const scalar_t* ot = o + (row + t) * V;
    acc_t* g = s.dn + t * Vp;
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < V; ++j) {
      dot += g[j] * static_cast<acc_t>(ot[j]);
      g[j] *= inv;
    }
    s.dd[t] = -dot * inv;
  }
  r.dn = s.dn;
  return r;
}

template <typename scalar_t>
void backward_kernel(const Problem& p, const scalar_t* go, const at::opmath_type<scalar_t>* gkv,
                     const at::opmath_type<scalar_t>* gz, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                     const scalar_t* o, const at::opmath_type<scalar_t>* den, const at::opmath_type<scalar_t>* kv0,
                     const at::opmath_type<scalar_t>* z0, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                     at::opmath_type<scalar_t>* dkv0, at::opmath_type<scalar_t>* dz0) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.units, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<acc_t> buf(3 * kBlockT * (Kp + Vp) + 3 * Kp * Vp + 2 * Kp + kBlockT);
    BlockScratch<acc_t> s;
    s.qf = buf.data();
    s.kf = s.qf + kBlockT * Kp;
    s.vf = s.kf + kBlockT * Kp;
    s.dn = s.vf + kBlockT * Vp;
    acc_t* gk = s.dn + kBlockT * Vp;  // dq'_t in the forward sweep, dk'_t in the reverse one
    acc_t* gv = gk + kBlockT * Kp;
    acc_t* ST = gv + kBlockT * Vp;  // S_t^T
    acc_t* dS = ST + Kp * Vp;
    acc_t* dST = dS + Kp * Vp;
    acc_t* zs = dST + Kp * Vp;  // z_t, then the reverse sum Z_t = grad_z + sum_{s>=t} q'_s dd_s
    acc_t* zr = zs + Kp;
    s.dd = zr + Kp;
    for (int64_t u = begin; u < end; ++u) {
      int64_t row0, len;
      p.span(u, &row0, &len);
      // Forward sweep: dq'_t = dn_t S_t^T + dd_t z_t.
      load_state(kv0, u, K, V, ST, Kp, Kp * Vp, true);
      load_vector(z0, u, K, zs, Kp);
      for (int64_t t0 = 0; t0 < len; t0 += kBlockT) {
        const int64_t nb = std::min(kBlockT, len - t0), row = row0 + t0;
        const BlockRows<acc_t> r = load_backward_block(p, row, nb, q, k, v, go, o, den, s, false);
        scan(ST, r.v, r.dn, Vp, r.k, gk, Kp, nb, false);
        for (int64_t t = 0; t < nb; ++t) {
          acc_t* g = gk + t * Kp;
          if (p.normalize) {
            const acc_t ddt = s.dd[t];
#pragma omp simd
            for (int64_t i = 0; i < K; ++i) {
              zs[i] += r.k[t * Kp + i];
              g[i] += ddt * zs[i];
            }
          }
          store_input_grad(g, q + (row + t) * K, dq + (row + t) * K, K, p.fm, scale);
        }
      }
      // Reverse sweep: dv_t = dS_t^T k'_t, dk'_t = dS_t v_t + Z_t.
      load_state(gkv, u, K, V, dS, Vp, Kp * Vp, false);
      load_state(gkv, u, K, V, dST, Kp, Kp * Vp, true);
      load_vector(gz, u, K, zr, Kp);
      for (int64_t t0 = (len - 1) / kBlockT * kBlockT; t0 >= 0 && len > 0; t0 -= kBlockT) {
        const int64_t nb = std::min(kBlockT, len - t0), row = row0 + t0;
        const BlockRows<acc_t> r = load_backward_block(p, row, nb, q, k, v, go, o, den, s, true);
        acc_t* dvr = output_rows(dv + row * V, V, gv, Vp, false);
        scan(dS, r.q, r.k, Kp, r.dn, dvr, Vp, nb, true);
        scan(dST, r.dn, r.v, Vp, r.q, gk, Kp, nb, true);
        for (int64_t t = nb - 1; t >= 0; --t) {
          acc_t* g = gk + t * Kp;
          // Z_t is constant (grad_z) without normalize: dd = 0.
          if (p.normalize || gz != nullptr) {
            const acc_t ddt = s.dd[t];
#pragma omp simd
            for (int64_t i = 0; i < K; ++i) {
              zr[i] += r.q[t * Kp + i] * ddt;
              g[i] += zr[i];
            }
          }
          store_input_grad(g, k + (row + t) * K, dk + (row + t) * K, K, p.fm, acc_t(1));
          if (dvr == reinterpret_cast<acc_t*>(dv + row * V)) continue;
          scalar_t* dvt = dv + (row + t) * V;
#pragma omp simd
          for (int64_t j = 0; j < V; ++j) dvt[j] = static_cast<scalar_t>(gv[t * Vp + j]);
        }
      }
      store_state(dS, Vp, dkv0 + u * K * V, K, V);
      std::copy(zr, zr + K, dz0 + u * K);
    }
  });
}

template <typename scalar_t>
void step_kernel(int64_t units, int64_t K, int64_t V, int64_t fm, bool normalize, double eps, double scale,
                 const scalar_t* q, const scalar_t* k, const scalar_t* v, const at::opmath_type<scalar_t>* kv,
                 const at::opmath_type<scalar_t>* z, scalar_t* o, at::opmath_type<scalar_t>* kv_out,
                 at::opmath_type<scalar_t>* z_out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<acc_t> buf(2 * K + 2 * V);
    acc_t* qf = buf.data();
    acc_t* kf = qf + K;
    acc_t* vf = kf + K;
    acc_t* num = vf + V;
    for (int64_t u = begin; u < end; ++u) {
      load_rows(q + u * K, 1, K, qf, K, fm, static_cast<acc_t>(scale));
      load_rows(k + u * K, 1, K, kf, K, fm, acc_t(1));
      load_rows(v + u * V, 1, V, vf, V, kIdentity, acc_t(1));
      std::fill(num, num + V, acc_t(0));
      acc_t dot = 0;
      for (int64_t i = 0; i < K; ++i) {
        const acc_t* src = kv + (u * K + i) * V;
        acc_t* dst = kv_out + (u * K + i) * V;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          dst[j] = src[j] + kf[i] * vf[j];
          num[j] += qf[i] * dst[j];
        }
        z_out[u * K + i] = z[u * K + i] + kf[i];
        dot += qf[i] * z_out[u * K + i];
      }
      const acc_t r = normalize ? acc_t(1) / (dot + static_cast<acc_t>(eps)) : acc_t(1);
      for (int64_t j = 0; j < V; ++j) o[u * V + j] = static_cast<scalar_t>(num[j] * r);
    }
  });
}

// ---- op entry points: argument checks, allocation, dtype dispatch ----

at::ScalarType state_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, int64_t feature_map) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastml::linear_attention: q, k, v must be 4-D");
  TORCH_CHECK(k.sizes() == q.sizes(), "fastml::linear_attention: k must have q's shape");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "fastml::linear_attention: v must be [B, H, T, V] with q's B, H, T");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastml::linear_attention: q, k, v must share a dtype");
  TORCH_CHECK(feature_map >= 0 && feature_map <= 2, "fastml::linear_attention: feature_map must be 0, 1 or 2");
}

// The optional state tensor as a contiguous tensor of the state dtype and the given shape (undefined if absent).
Tensor optional_state(const std::optional<Tensor>& t, at::IntArrayRef shape, at::ScalarType st, const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->sizes() == shape, "fastml::linear_attention: ", name, " must have shape ", shape, ", got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == st, "fastml::linear_attention: ", name, " must have dtype ", st);
  return t->contiguous();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

Problem make_problem(const Tensor& q, const Tensor& v, const Tensor& cu, int64_t feature_map, bool normalize,
                     double eps, double scale) {
  Problem p;
  p.H = q.size(1);
  p.T = q.size(2);
  p.K = q.size(3);
  p.V = v.size(3);
  const int64_t pad = std::max<int64_t>(kRowStep, q.scalar_type() == at::kDouble ? kLanes<double> : kLanes<float>);
  p.Kp = round_up(std::max<int64_t>(p.K, 1), pad);
  p.Vp = round_up(std::max<int64_t>(p.V, 1), pad);
  p.fm = feature_map;
  p.normalize = normalize;
  p.eps = eps;
  p.scale = scale;
  p.cu = cu.defined() ? cu.const_data_ptr<int64_t>() : nullptr;
  p.units = (cu.defined() ? cu.size(0) - 1 : q.size(0)) * p.H;
  return p;
}

Tensor checked_cu_seqlens(const std::optional<Tensor>& cu_seqlens, const Tensor& q) {
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) return Tensor();
  const Tensor& cu = *cu_seqlens;
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.scalar_type() == at::kLong,
              "fastml::linear_attention: cu_seqlens must be a 1-D int64 tensor [N+1]");
  TORCH_CHECK(q.size(0) == 1, "fastml::linear_attention: with cu_seqlens the batch size must be 1");
  Tensor c = cu.contiguous();
  // Checked here too (N+1 reads) because the kernels index q, k, v by these offsets.
  const int64_t* o = c.const_data_ptr<int64_t>();
  const int64_t n = c.size(0) - 1;
  TORCH_CHECK(o[0] == 0 && o[n] == q.size(2), "fastml::linear_attention: cu_seqlens must start at 0 and end at T");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(o[i] <= o[i + 1], "fastml::linear_attention: cu_seqlens must be non-decreasing");
  }
  return c;
}

int64_t num_sequences(const Tensor& q, const Tensor& cu) { return cu.defined() ? cu.size(0) - 1 : q.size(0); }

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attention_fwd(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& kv0_in,
    const std::optional<Tensor>& z0_in, const std::optional<Tensor>& cu_seqlens, int64_t feature_map,
    bool normalize, double eps, double scale) {
  check_inputs(q_in, k_in, v_in, feature_map);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor cu = checked_cu_seqlens(cu_seqlens, q);
  const Problem p = make_problem(q, v, cu, feature_map, normalize, eps, scale);
  const int64_t N = num_sequences(q, cu);
  const at::ScalarType st = state_type(q);
  const Tensor kv0 = optional_state(kv0_in, {N, p.H, p.K, p.V}, st, "kv0");
  const Tensor z0 = optional_state(z0_in, {N, p.H, p.K}, st, "z0");
  Tensor o = at::empty_like(v);
  Tensor kv = at::empty({N, p.H, p.K, p.V}, q.options().dtype(st));
  Tensor z = at::empty({N, p.H, p.K}, q.options().dtype(st));
  Tensor den = at::empty({q.size(0), p.H, p.T}, q.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), ptr_or_null<acc_t>(kv0), ptr_or_null<acc_t>(z0),
                             o.data_ptr<scalar_t>(), kv.data_ptr<acc_t>(), z.data_ptr<acc_t>(),
                             den.data_ptr<acc_t>());
  });
  return {o, kv, z, den};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attention_bwd(
    const Tensor& go_in, const std::optional<Tensor>& gkv_in, const std::optional<Tensor>& gz_in,
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& o_in, const Tensor& den_in,
    const std::optional<Tensor>& kv0_in, const std::optional<Tensor>& z0_in,
    const std::optional<Tensor>& cu_seqlens, int64_t feature_map, bool normalize, double eps, double scale) {
  check_inputs(q_in, k_in, v_in, feature_map);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  TORCH_CHECK(go_in.sizes() == v.sizes() && o_in.sizes() == v.sizes(),
              "fastml::linear_attention_bwd: grad_o and o must have v's shape");
  TORCH_CHECK(go_in.scalar_type() == q.scalar_type() && o_in.scalar_type() == q.scalar_type(),
              "fastml::linear_attention_bwd: grad_o and o must have q's dtype");
  const Tensor go = go_in.contiguous(), o = o_in.contiguous();
  const Tensor cu = checked_cu_seqlens(cu_seqlens, q);
  const Problem p = make_problem(q, v, cu, feature_map, normalize, eps, scale);
  const int64_t N = num_sequences(q, cu);
  const at::ScalarType st = state_type(q);
  TORCH_CHECK(den_in.sizes() == at::IntArrayRef({q.size(0), p.H, p.T}) && den_in.scalar_type() == st,
              "fastml::linear_attention_bwd: den must be [B, H, T] in the state dtype");
  const Tensor den = den_in.contiguous();
  const Tensor gkv = optional_state(gkv_in, {N, p.H, p.K, p.V}, st, "grad_kv");
  const Tensor gz = optional_state(gz_in, {N, p.H, p.K}, st, "grad_z");
  const Tensor kv0 = optional_state(kv0_in, {N, p.H, p.K, p.V}, st, "kv0");
  const Tensor z0 = optional_state(z0_in, {N, p.H, p.K}, st, "z0");
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Tensor dkv0 = at::empty({N, p.H, p.K, p.V}, q.options().dtype(st));
  Tensor dz0 = at::empty({N, p.H, p.K}, q.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(p, go.const_data_ptr<scalar_t>(), ptr_or_null<acc_t>(gkv), ptr_or_null<acc_t>(gz),
                              q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                              v.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), den.const_data_ptr<acc_t>(),
                              ptr_or_null<acc_t>(kv0), ptr_or_null<acc_t>(z0), dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dkv0.data_ptr<acc_t>(),
                              dz0.data_ptr<acc_t>());
  });
  return {dq, dk, dv, dkv0, dz0};
}

std::tuple<Tensor, Tensor, Tensor> linear_attention_step(const Tensor& q_in, const Tensor& k_in,
                                                         const Tensor& v_in, const Tensor& kv_in,
                                                         const Tensor& z_in, int64_t feature_map, bool normalize,
                                                         double eps, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.sizes() == q_in.sizes() && v_in.dim() == 3 && v_in.size(0) == q_in.size(0) &&
                  v_in.size(1) == q_in.size(1),
              "fastml::linear_attention_step: q, k must be [B, H, K] and v [B, H, V]");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "fastml::linear_attention_step: q, k, v must share a dtype");
  TORCH_CHECK(feature_map >= 0 && feature_map <= 2, "fastml::linear_attention_step: feature_map must be 0, 1 or 2");
  const int64_t B = q_in.size(0), H = q_in.size(1), K = q_in.size(2), V = v_in.size(2);
  const at::ScalarType st = state_type(q_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor kv = optional_state(kv_in, {B, H, K, V}, st, "kv");
  const Tensor z = optional_state(z_in, {B, H, K}, st, "z");
  Tensor o = at::empty_like(v), kv_out = at::empty_like(kv), z_out = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    step_kernel<scalar_t>(B * H, K, V, feature_map, normalize, eps, scale, q.const_data_ptr<scalar_t>(),
                          k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), kv.const_data_ptr<acc_t>(),
                          z.const_data_ptr<acc_t>(), o.data_ptr<scalar_t>(), kv_out.data_ptr<acc_t>(),
                          z_out.data_ptr<acc_t>());
  });
  return {o, kv_out, z_out};
}

}  // namespace
}  // namespace fastml

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("linear_attention_fwd", &fastml::linear_attention_fwd);
  m.impl("linear_attention_bwd", &fastml::linear_attention_bwd);
  m.impl("linear_attention_step", &fastml::linear_attention_step);
}
