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
// per-thread scratch that lives as long as the thread. Nothing of size T*K*V is ever stored: the backward rescans
// the states. With fewer units than threads, the forward cuts each unit's state into column groups scanned as
// separate tasks (no extra work, the serial scan's bits), and the backward cuts each unit's tokens into segments
// run in parallel from states obtained by a prefix over per-segment sums (make_split, below; the README says why
// each pass takes the split it takes). The large per-token outputs come from an
// allocator that reuses freed blocks (ReuseAllocator), so that repeated calls do not page-fault them in again.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/linear_attention_kernels.h"

namespace fastml {
namespace {

using at::Tensor;
using namespace la_cpu;

// Sizes and options of one call, and where each (sequence, head) unit's tokens are.
struct Problem {
  int64_t H, T, K, V, Kp, Vp, units;
  int64_t lanes;  // vector width of the compute type: Kp and Vp are multiples of it
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

// ---- the segment-parallel split ----
//
// With fewer (sequence, head) units than threads, each unit's tokens are cut into segments that run in parallel.
// Forward: (1) the sums dS_p = sum k'_t v_t^T and dz_p = sum k'_t over every segment but the last, each cut into
// pieces so that all threads share the pass; (2) a prefix over segments, S_in(p) = S_0 + sum_{q<p} dS_q; (3) every
// segment's ordinary scan from its S_in. The backward is the mirror image: (1) the same sums for dq's forward
// sweep, and dS'_p = sum q'_t dn_t^T, dz'_p = sum q'_t dd_t over every segment but the first for the reverse
// sweep; (2) a prefix forward and a suffix backward; (3) both sweeps of every segment from its states. Results
// equal the serial scan up to float32 rounding (the sums are added in a different order). Pass (1) costs half a
// scan per token of the segments it covers, so the split pays only when threads would otherwise be idle.

// A stretch of tokens [tb, te) of unit u whose initial states are entry `state` of the arrays a pass reads them
// from (the user's kv0/z0 indexed by unit, or the prefix states indexed by segment); `last` when it ends the unit
// (it writes the final state), `first` when it starts it (the backward writes dkv0, dz0).
// With the forward's column split, the segment's scan covers only column group `col` of `ncol` of the state (see
// column_range); group 0 also writes what does not depend on the columns (den, z).
struct Segment {
  int64_t u, tb, te, state;
  bool first, last;
  int64_t col = 0, ncol = 1;
  Segment with_col(int64_t c, int64_t n) const {
    Segment g = *this;
    g.col = c;
    g.ncol = n;
    return g;
  }
};

// Columns [b, e) of group g.col of g.ncol over a padded state dimension of n elements (a multiple of the vector
// width L): whole vectors, as evenly as they go; e is clipped to `real` (the unpadded size) by the callers that
// write tensors.
void column_range(const Segment& g, int64_t n, int64_t L, int64_t* b, int64_t* e) {
  const int64_t vecs = n / L;
  *b = g.col * vecs / g.ncol * L;
  *e = (g.col + 1) * vecs / g.ncol * L;
}

// A non-negative integer setting from the environment, 0 when unset.
int64_t env_count(const char* name, const char* what) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long long n = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != nullptr && *end == '\0' && n >= 0, name, " must be a non-negative integer (", what,
                    "), got '", env, "'");
  return n;
}

// Tokens per segment when FASTML_LA_SEGMENT is set (a positive integer): every unit is cut into segments of that
// many tokens whatever the unit and thread counts. For tests of the split and for tuning; 0 when unset.
int64_t forced_segment_length() { return env_count("FASTML_LA_SEGMENT", "tokens per segment"); }

// Column groups per segment when FASTML_LA_COLUMNS is set (a positive integer, capped at the number of vectors in
// the smaller head dim): the same test and tuning knob for the column split. 1 turns the column split off.
int64_t forced_column_groups() { return env_count("FASTML_LA_COLUMNS", "column groups"); }

// Below this many tokens a segment is not worth its share of the extra pass and of the parallel region's start.
constexpr int64_t kMinSegment = 1024;
// Below this many tokens per unit (on average) a column split is not worth the parallel region's start.
constexpr int64_t kMinColumnTokens = 256;
// Tokens per lockstep chunk of the column split (a multiple of kBlockT): the converted q' and k' rows of 512 tokens
// (256 KB in float32 at K = 64, two chunks' worth in flight) stay in a core's L2 until every group has read them;
// 256 tokens measured slower (twice the parallel regions), 1024 no faster.
constexpr int64_t kLockstepTokens = 512;

struct Split {
  std::vector<Segment> segs;     // every unit's segments, in order (unit, then tokens); empty: one per unit
  std::vector<int64_t> seg0;     // first segment of unit u: seg0[u] .. seg0[u + 1] - 1
  std::vector<int64_t> pieces;   // pass (1): pieces[s] .. pieces[s + 1] - 1 are the pieces of segment s
  int64_t n_pieces = 0;
  int64_t threads = 1;
  int64_t cols = 1;              // column groups per segment: tasks = segments x cols
  bool segmented() const { return !segs.empty(); }
};

// Column groups per unit: with fewer units than threads, as many as fill the threads (ceil(threads / units)), at
// most one per vector of the smaller padded head dim; 1 (no column split) otherwise.
int64_t column_groups(const Problem& p, int64_t threads) {
  const int64_t most = std::max<int64_t>(1, std::min(p.Kp, p.Vp) / p.lanes);
  const int64_t forced = forced_column_groups();
  if (forced > 0) return std::min(forced, most);
  if (p.units == 0 || p.units >= threads || threads < 2) return 1;
  int64_t tokens = 0;
  for (int64_t u = 0; u < p.units; ++u) {
    int64_t row0, len;
    p.span(u, &row0, &len);
    tokens += len;
  }
  if (tokens < kMinColumnTokens * p.units) return 1;
  return std::min((threads + p.units - 1) / p.units, most);
}

// The split of one call. First the column split, which costs nothing: the scans of a state's column groups are
// independent (every output column depends on its own state columns only), so groups run as separate tasks that
// read the same tokens; only the O(K) per-token normalizer is computed by each group of the forward. Segments
// only when there are more threads than units x column groups: then ceil(threads / (units x cols)) segments per
// unit (fewer for a short unit), cut at whole 64-token blocks, and each segment's pass-(1) sum cut into one piece
// per thread.
Split make_split(const Problem& p, bool columns) {
  Split s;
  s.threads = at::get_num_threads();
  s.cols = columns ? column_groups(p, s.threads) : 1;
  const int64_t forced = forced_segment_length();
  int64_t per_unit = 1;
  if (forced == 0) {
    const int64_t tasks = p.units * s.cols;
    if (p.units == 0 || tasks >= s.threads || s.threads < 2) return s;
    per_unit = (s.threads + tasks - 1) / tasks;
  }
  bool any = false;
  s.seg0.push_back(0);
  for (int64_t u = 0; u < p.units; ++u) {
    int64_t row0, len;
    p.span(u, &row0, &len);
    int64_t n = 1, step = len;
    if (forced > 0) {
      n = std::max<int64_t>(1, (len + forced - 1) / forced);
      step = forced;
    } else {
      n = std::max<int64_t>(1, std::min(per_unit, len / kMinSegment));
      step = round_up((len + n - 1) / n, kBlockT);
      n = std::max<int64_t>(1, (len + step - 1) / step);
    }
    any = any || n > 1;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t tb = std::min(len, i * step), te = i + 1 == n ? len : std::min(len, (i + 1) * step);
      s.segs.push_back({u, tb, te, static_cast<int64_t>(s.segs.size()), i == 0, i + 1 == n});
    }
    s.seg0.push_back(static_cast<int64_t>(s.segs.size()));
  }
  if (!any) {
    Split none;
    none.threads = s.threads;
    none.cols = s.cols;
    return none;
  }
  const int64_t per_seg = std::max<int64_t>(2, s.threads);
  s.pieces.push_back(0);
  for (size_t i = 0; i < s.segs.size(); ++i) {
    s.pieces.push_back(s.pieces.back() + per_seg);
  }
  s.n_pieces = s.pieces.back();
  return s;
}

// Tokens [b, e) of piece j of segment g: the segment cut into equal runs of whole blocks (some may be empty).
void piece_range(const Split& s, const Segment& g, int64_t j, int64_t* b, int64_t* e) {
  const int64_t n = s.pieces[g.state + 1] - s.pieces[g.state];
  const int64_t len = g.te - g.tb;
  const int64_t step = round_up((len + n - 1) / n, kBlockT);
  *b = std::min(g.te, g.tb + j * step);
  *e = std::min(g.te, g.tb + (j + 1) * step);
}

// Scratch for the rows of a run of tokens (one block, or a lockstep chunk), and the rows the scans read (the
// scratch or the input tensors, see rows_view): q', k', v, and for the backward dn and dd.
template <typename acc_t>
struct BlockScratch {
  acc_t *qf, *kf, *vf, *dn, *dd;
  // The scratch from token t of the run on.
  BlockScratch at(int64_t t, int64_t Kp, int64_t Vp) const {
    return {qf + t * Kp, kf + t * Kp, vf + t * Vp, dn + t * Vp, dd + t};
  }
};
template <typename acc_t>
struct BlockRows {
  const acc_t *q = nullptr, *k = nullptr, *v = nullptr, *dn = nullptr, *dd = nullptr;
  // The rows from token t of the run on.
  BlockRows at(int64_t t, int64_t Kp, int64_t Vp) const {
    BlockRows r;
    r.q = q != nullptr ? q + t * Kp : nullptr;
    r.k = k != nullptr ? k + t * Kp : nullptr;
    r.v = v != nullptr ? v + t * Vp : nullptr;
    r.dn = dn != nullptr ? dn + t * Vp : nullptr;
    r.dd = dd != nullptr ? dd + t : nullptr;
    return r;
  }
};

// Scratch for n tokens' rows at buf: q', k' [n x Kp], v, dn [n x Vp], dd [n].
template <typename acc_t>
BlockScratch<acc_t> rows_scratch(const Problem& p, acc_t* buf, int64_t n) {
  BlockScratch<acc_t> s;
  s.qf = buf;
  s.kf = s.qf + n * p.Kp;
  s.vf = s.kf + n * p.Kp;
  s.dn = s.vf + n * p.Vp;
  s.dd = s.dn + n * p.Vp;
  return s;
}
template <typename acc_t>
int64_t rows_scratch_size(const Problem& p, int64_t n) {
  return n * (2 * p.Kp + 2 * p.Vp + 1);
}

// The forward's rows [row, row + n): q' (feature map and scale), k' (feature map), v. With n = 0 it converts
// nothing and returns where a run's rows are (its scratch, or the inputs themselves).
template <typename scalar_t, typename acc_t>
BlockRows<acc_t> load_forward_block(const Problem& p, int64_t row, int64_t n, const scalar_t* q, const scalar_t* k,
                                    const scalar_t* v, const BlockScratch<acc_t>& s) {
  BlockRows<acc_t> r;
  r.q = rows_view(q + row * p.K, n, p.K, s.qf, p.Kp, p.fm, static_cast<acc_t>(p.scale));
  r.k = rows_view(k + row * p.K, n, p.K, s.kf, p.Kp, p.fm, acc_t(1));
  r.v = rows_view(v + row * p.V, n, p.V, s.vf, p.Vp, kIdentity, acc_t(1));
  return r;
}

// The forward recurrence over tokens [g.tb, g.te) on the state S [Kp x Vp] and z [Kp], updated in place: column
// group g.col of o (and, for group 0, den). pre: the stretch's rows already converted, or null.
template <typename scalar_t>
void forward_run(const Problem& p, const Segment& g, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                 at::opmath_type<scalar_t>* S, at::opmath_type<scalar_t>* zs, scalar_t* o,
                 at::opmath_type<scalar_t>* den, at::opmath_type<scalar_t>* buf,
                 const BlockRows<at::opmath_type<scalar_t>>* pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t V = p.V, Kp = p.Kp, Vp = p.Vp;
  const BlockScratch<acc_t> rs = rows_scratch(p, buf, kBlockT);
  acc_t* num = buf + rows_scratch_size<acc_t>(p, kBlockT);
  acc_t* d = num + kBlockT * Vp;
  int64_t row0, len, jb, je;
  p.span(g.u, &row0, &len);
  column_range(g, Vp, p.lanes, &jb, &je);
  const int64_t jend = std::min(je, V);
  // Every column group needs den only to normalize; the first one also writes den and z.
  const bool dots = g.col == 0 || p.normalize;
  for (int64_t t0 = g.tb; t0 < g.te; t0 += kBlockT) {
    const int64_t nb = std::min(kBlockT, g.te - t0), row = row0 + t0;
    const BlockRows<acc_t> r = pre != nullptr ? pre->at(t0 - g.tb, Kp, Vp)
                                              : load_forward_block<scalar_t, acc_t>(p, row, nb, q, k, v, rs);
    if (dots) {
      running_dots(zs, r.k, r.q, Kp, nb, d, static_cast<acc_t>(p.eps));
      if (g.col == 0) std::copy(d, d + nb, den + row);
    }
    acc_t* out = output_rows(o + row * V, V, num, Vp, p.normalize);
    scan(S, r.k, r.q, Kp, r.v, out, Vp, nb, false, jb, je);
    if (out == reinterpret_cast<acc_t*>(o + row * V)) continue;
    for (int64_t t = 0; t < nb; ++t) {
      const acc_t inv = p.normalize ? acc_t(1) / d[t] : acc_t(1);
      scalar_t* ot = o + (row + t) * V;
#pragma omp simd
      for (int64_t j = jb; j < jend; ++j) ot[j] = static_cast<scalar_t>(num[t * Vp + j] * inv);
    }
  }
}

template <typename acc_t>
int64_t forward_run_scratch_size(const Problem& p) {
  return rows_scratch_size<acc_t>(p, kBlockT) + kBlockT * p.Vp + kBlockT;
}

// The forward scan of one stretch of tokens (the whole unit in the serial path, one segment in the parallel one)
// with the state in this thread's scratch: from entry g.state of kv_in/z_in (null: zero); when g.last, the final
// state goes to entry g.u of kv, z.
template <typename scalar_t>
void forward_segment(const Problem& p, const Segment& g, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                     const at::opmath_type<scalar_t>* kv_in, const at::opmath_type<scalar_t>* z_in, scalar_t* o,
                     at::opmath_type<scalar_t>* kv, at::opmath_type<scalar_t>* z, at::opmath_type<scalar_t>* den,
                     at::opmath_type<scalar_t>* buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  acc_t* S = buf + forward_run_scratch_size<acc_t>(p);
  acc_t* zs = S + Kp * Vp;
  load_state(kv_in, g.state, K, V, S, Vp, Kp * Vp, false);
  load_vector(z_in, g.state, K, zs, Kp);
  forward_run<scalar_t>(p, g, q, k, v, S, zs, o, den, buf, nullptr);
  if (g.last) {
    int64_t jb, je;
    column_range(g, Vp, p.lanes, &jb, &je);
    store_state(S, Vp, kv + g.u * K * V, K, V, jb, je);
    if (g.col == 0) std::copy(zs, zs + K, z + g.u * K);
  }
}

template <typename acc_t>
int64_t forward_scratch_size(const Problem& p) {
  return forward_run_scratch_size<acc_t>(p) + p.Kp * p.Vp + p.Kp;
}

// Pass (1) of the forward split (also the backward's forward half): the sum over tokens [b, e) of unit u of
// k'_t v_t^T into sS [K x V] and of k'_t into sz [K].
template <typename scalar_t>
void sum_kv(const Problem& p, int64_t u, int64_t b, int64_t e, const scalar_t* k, const scalar_t* v,
            at::opmath_type<scalar_t>* sS, at::opmath_type<scalar_t>* sz, at::opmath_type<scalar_t>* buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  acc_t* kf = buf;
  acc_t* vf = kf + kBlockT * Kp;
  acc_t* M = vf + kBlockT * Vp;
  acc_t* zs = M + Kp * Vp;
  std::fill(M, M + Kp * Vp + Kp, acc_t(0));
  int64_t row0, len;
  p.span(u, &row0, &len);
  for (int64_t t0 = b; t0 < e; t0 += kBlockT) {
    const int64_t nb = std::min(kBlockT, e - t0), row = row0 + t0;
    const acc_t* kr = rows_view(k + row * K, nb, K, kf, Kp, p.fm, acc_t(1));
    const acc_t* vr = rows_view(v + row * V, nb, V, vf, Vp, kIdentity, acc_t(1));
    accumulate(M, kr, Kp, vr, Vp, nb);
    for (int64_t t = 0; t < nb; ++t) {
#pragma omp simd
      for (int64_t i = 0; i < Kp; ++i) zs[i] += kr[t * Kp + i];
    }
  }
  store_state(M, Vp, sS, K, V);
  std::copy(zs, zs + K, sz);
}

// Pass (2): the states each segment starts from, kv_in/z_in (entry by segment), as S_0 (the user's kv0/z0 entry u,
// or zero) plus the sums of the unit's earlier segments; sums holds the pieces' sums [n_pieces x (K*V + K)].
// With reverse, the mirror: each segment's state is the user's final-state gradient plus the later segments' sums.
template <typename acc_t>
void prefix_states(const Problem& p, const Split& s, const acc_t* sums, const acc_t* S0, const acc_t* z0,
                   acc_t* kv_in, acc_t* z_in, bool reverse) {
  const int64_t KV = p.K * p.V, K = p.K, stride = KV + K;
  for (int64_t u = 0; u < p.units; ++u) {
    const int64_t first = s.seg0[u], last = s.seg0[u + 1] - 1, n = last - first + 1;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t g = reverse ? last - i : first + i;
      acc_t* S = kv_in + g * KV;
      acc_t* z = z_in + g * K;
      if (i == 0) {
        if (S0 != nullptr) {
          std::copy(S0 + u * KV, S0 + (u + 1) * KV, S);
        } else {
          std::fill(S, S + KV, acc_t(0));
        }
        if (z0 != nullptr) {
          std::copy(z0 + u * K, z0 + (u + 1) * K, z);
        } else {
          std::fill(z, z + K, acc_t(0));
        }
        continue;
      }
      const int64_t prev = reverse ? g + 1 : g - 1;
      std::copy(kv_in + prev * KV, kv_in + (prev + 1) * KV, S);
      std::copy(z_in + prev * K, z_in + (prev + 1) * K, z);
      for (int64_t j = s.pieces[prev]; j < s.pieces[prev + 1]; ++j) {
        const acc_t* src = sums + j * stride;
        for (int64_t e = 0; e < KV; ++e) S[e] += src[e];
        for (int64_t e = 0; e < K; ++e) z[e] += src[KV + e];
      }
    }
  }
}

// ---- the column split in lockstep ----
//
// Without segments, a unit's column groups are separate tasks that read the same tokens. Run freely, each would
// also convert those tokens (feature map, scale, dtype, padding) and stream them from memory on its own.
// So the tokens are cut into chunks of kLockstepTokens, run one chunk at a time across all tasks: in parallel
// region r every task (unit u, column group c) converts its share (c of cols, whole blocks) of the next chunk into
// a buffer all tasks share, then scans the chunk converted in region r - 1 from the other buffer. The state stays
// in place between chunks: one S per unit, whose columns the groups own, and one z per group.
struct Lockstep {
  int64_t C = kLockstepTokens, n_chunks = 1;
  std::vector<int64_t> row0, lens;
  bool has(int64_t u, int64_t i) const { return i == 0 || i * C < lens[u]; }
  int64_t top(int64_t u) const { return lens[u] == 0 ? 0 : (lens[u] - 1) / C; }  // the unit's last chunk
  void range(int64_t u, int64_t i, int64_t* tb, int64_t* te) const {
    *tb = std::min(lens[u], i * C);
    *te = std::min(lens[u], (i + 1) * C);
  }
};

Lockstep make_lockstep(const Problem& p) {
  Lockstep ls;
  ls.row0.resize(p.units);
  ls.lens.resize(p.units);
  for (int64_t u = 0; u < p.units; ++u) {
    p.span(u, &ls.row0[u], &ls.lens[u]);
    ls.n_chunks = std::max(ls.n_chunks, ls.top(u) + 1);
  }
  return ls;
}

// The regions over the chunks: prep(u, t0, nb, scratch) converts tokens [t0, t0 + nb) of unit u into scratch
// (already offset to t0 within its chunk's buffer); scan(u, c, i, chunk) scans column group c of chunk i of unit
// u, whose rows are in the buffer at `chunk`. Region r converts chunk r and scans chunk r - 1.
template <typename acc_t, typename Prep, typename Scan>
void lockstep_regions(const Problem& p, const Lockstep& ls, int64_t G, acc_t* chunks, int64_t scratch, Prep prep,
                      Scan scan_chunk) {
  const int64_t U = p.units, per_chunk = rows_scratch_size<acc_t>(p, ls.C), n = ls.n_chunks;
  for (int64_t r = 0; r <= n; ++r) {
    at::parallel_for(0, U * G, 1, [&](int64_t begin, int64_t end) {
      acc_t* buf = thread_scratch<acc_t>(scratch);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t u = w / G, c = w % G;
        if (r < n && ls.has(u, r)) {
          int64_t tb, te;
          ls.range(u, r, &tb, &te);
          const BlockScratch<acc_t> into = rows_scratch(p, chunks + ((r % 2) * U + u) * per_chunk, ls.C);
          const int64_t blocks = (te - tb + kBlockT - 1) / kBlockT;
          for (int64_t b = c * blocks / G; b < (c + 1) * blocks / G; ++b) {
            const int64_t t0 = tb + b * kBlockT;
            prep(u, t0, std::min(kBlockT, te - t0), into.at(t0 - tb, p.Kp, p.Vp));
          }
        }
        if (r > 0 && ls.has(u, r - 1)) {
          scan_chunk(u, c, r - 1, chunks + (((r - 1) % 2) * U + u) * per_chunk, buf);
        }
      }
    });
  }
}

// Shared memory of one lockstep call, the calling thread's slot-1 scratch: two chunk buffers per unit, then the
// state every task of a unit updates in place (each its own columns), S [Kp x Vp] per unit, and one z [Kp] per
// (unit, column group).
template <typename acc_t>
acc_t* lockstep_buffers(const Problem& p, const Lockstep& ls, int64_t groups, acc_t** S) {
  const int64_t U = p.units, chunk = 2 * U * rows_scratch_size<acc_t>(p, ls.C);
  acc_t* base = thread_scratch<acc_t, 1>(chunk + U * (p.Kp * p.Vp + groups * p.Kp));
  *S = base + chunk;
  return base;
}

// Whether the forward converts the rows of q, k or v before scanning them (load_forward_block's rows_view calls).
template <typename scalar_t>
bool converts_rows(const Problem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  return !(reads_in_place<acc_t, scalar_t>(p.K, p.Kp, p.fm, static_cast<acc_t>(p.scale)) &&
           reads_in_place<acc_t, scalar_t>(p.K, p.Kp, p.fm, acc_t(1)) &&
           reads_in_place<acc_t, scalar_t>(p.V, p.Vp, kIdentity, acc_t(1)));
}

template <typename scalar_t>
void forward_lockstep(const Problem& p, const Split& s, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                      const at::opmath_type<scalar_t>* kv0, const at::opmath_type<scalar_t>* z0, scalar_t* o,
                      at::opmath_type<scalar_t>* kv, at::opmath_type<scalar_t>* z, at::opmath_type<scalar_t>* den) {
  using acc_t = at::opmath_type<scalar_t>;
  const Lockstep ls = make_lockstep(p);
  const int64_t U = p.units, G = s.cols, K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  // S [U][Kp x Vp], shared by the unit's groups; z [U][G][Kp], one per group (each runs the normalizer's sum).
  acc_t* S;
  acc_t* chunks = lockstep_buffers(p, ls, G, &S);
  acc_t* zs = S + U * Kp * Vp;
  for (int64_t u = 0; u < U; ++u) {
    load_state(kv0, u, K, V, S + u * Kp * Vp, Vp, Kp * Vp, false);
    for (int64_t c = 0; c < G; ++c) load_vector(z0, u, K, zs + (u * G + c) * Kp, Kp);
  }
  auto prep = [&](int64_t u, int64_t t0, int64_t nb, const BlockScratch<acc_t>& into) {
    load_forward_block<scalar_t, acc_t>(p, ls.row0[u] + t0, nb, q, k, v, into);
  };
  auto scan_chunk = [&](int64_t u, int64_t c, int64_t i, acc_t* chunk, acc_t* buf) {
    int64_t tb, te;
    ls.range(u, i, &tb, &te);
    const BlockRows<acc_t> pre = load_forward_block<scalar_t, acc_t>(p, ls.row0[u] + tb, 0, q, k, v,
                                                                     rows_scratch(p, chunk, ls.C));
    const Segment g = Segment{u, tb, te, u, i == 0, i == ls.top(u)}.with_col(c, G);
    forward_run<scalar_t>(p, g, q, k, v, S + u * Kp * Vp, zs + (u * G + c) * Kp, o, den, buf, &pre);
  };
  lockstep_regions<acc_t>(p, ls, G, chunks, forward_run_scratch_size<acc_t>(p), prep, scan_chunk);
  for (int64_t u = 0; u < U; ++u) {
    store_state(S + u * Kp * Vp, Vp, kv + u * K * V, K, V);
    std::copy(zs + u * G * Kp, zs + u * G * Kp + K, z + u * K);
  }
}

template <typename scalar_t>
void forward_kernel(const Problem& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    const at::opmath_type<scalar_t>* kv0, const at::opmath_type<scalar_t>* z0, scalar_t* o,
                    at::opmath_type<scalar_t>* kv, at::opmath_type<scalar_t>* z, at::opmath_type<scalar_t>* den) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t scratch = forward_scratch_size<acc_t>(p);
  const Split s = make_split(p, true);
  if (!s.segmented() && s.cols > 1 && converts_rows<scalar_t>(p)) {
    forward_lockstep<scalar_t>(p, s, q, k, v, kv0, z0, o, kv, z, den);
    return;
  }
  if (!s.segmented()) {
    // One task per unit, or per (unit, column group) when the scans read the inputs as they are: then the groups
    // run freely, without the lockstep's pauses.
    at::parallel_for(0, p.units * s.cols, 1, [&](int64_t begin, int64_t end) {
      acc_t* buf = thread_scratch<acc_t>(scratch);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t u = w / s.cols;
        int64_t row0, len;
        p.span(u, &row0, &len);
        const Segment g = Segment{u, 0, len, u, true, true}.with_col(w % s.cols, s.cols);
        forward_segment<scalar_t>(p, g, q, k, v, kv0, z0, o, kv, z, den, buf);
      }
    });
    return;
  }
  const int64_t KV = p.K * p.V, stride = KV + p.K, n_seg = static_cast<int64_t>(s.segs.size());
  std::vector<acc_t> sums(static_cast<size_t>(s.n_pieces * stride));
  std::vector<acc_t> kv_in(static_cast<size_t>(n_seg * KV)), z_in(static_cast<size_t>(n_seg * p.K));
  // (1) the sums of every segment but each unit's last, one piece per task (only those pieces are listed, so
  // that parallel_for's even split of the list is an even split of the work).
  std::vector<std::pair<int64_t, int64_t>> work;  // (segment, piece)
  for (int64_t g = 0; g < n_seg; ++g) {
    if (s.segs[g].last) continue;
    for (int64_t j = s.pieces[g]; j < s.pieces[g + 1]; ++j) work.emplace_back(g, j);
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    acc_t* buf = thread_scratch<acc_t>(scratch);
    for (int64_t w = begin; w < end; ++w) {
      const auto [g, j] = work[w];
      const Segment& seg = s.segs[g];
      int64_t b, e;
      piece_range(s, seg, j - s.pieces[g], &b, &e);
      sum_kv<scalar_t>(p, seg.u, b, e, k, v, sums.data() + j * stride, sums.data() + j * stride + KV, buf);
    }
  });
  // (2) the prefix; (3) every segment (each of its column groups) from its state.
  prefix_states(p, s, sums.data(), kv0, z0, kv_in.data(), z_in.data(), false);
  at::parallel_for(0, n_seg * s.cols, 1, [&](int64_t begin, int64_t end) {
    acc_t* buf = thread_scratch<acc_t>(scratch);
    for (int64_t w = begin; w < end; ++w) {
      const Segment g = s.segs[w / s.cols].with_col(w % s.cols, s.cols);
      forward_segment<scalar_t>(p, g, q, k, v, kv_in.data(), z_in.data(), o, kv, z, den, buf);
    }
  });
}


// Block [row, row + nb) for the backward: q' (if with_q), k' (if with_k), v (if with_v), dn = do / den and
// dd = -(do . o) / den (with normalize; else dn = do and dd = 0). With nb = 0, as load_forward_block.
template <typename scalar_t, typename acc_t>
BlockRows<acc_t> load_backward_block(const Problem& p, int64_t row, int64_t nb, const scalar_t* q,
                                     const scalar_t* k, const scalar_t* v, const scalar_t* go, const scalar_t* o,
                                     const acc_t* den, const BlockScratch<acc_t>& s, bool with_q, bool with_k = true,
                                     bool with_v = true) {
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  BlockRows<acc_t> r;
  r.q = with_q ? rows_view(q + row * K, nb, K, s.qf, Kp, p.fm, static_cast<acc_t>(p.scale)) : nullptr;
  r.k = with_k ? rows_view(k + row * K, nb, K, s.kf, Kp, p.fm, acc_t(1)) : nullptr;
  r.v = with_v ? rows_view(v + row * V, nb, V, s.vf, Vp, kIdentity, acc_t(1)) : nullptr;
  r.dd = s.dd;
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

// The backward's inputs and outputs, one struct so that the per-segment functions keep short signatures.
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *go, *q, *k, *v, *o;
  const acc_t *gkv, *gz, *den, *kv0, *z0;
  scalar_t *dq, *dk, *dv;
  acc_t *dkv0, *dz0;
};

template <typename acc_t>
int64_t backward_scratch_size(const Problem& p) {
  return rows_scratch_size<acc_t>(p, kBlockT) + kBlockT * (p.Kp + p.Vp) + 3 * p.Kp * p.Vp + 2 * p.Kp;
}

// Both sweeps of the backward over one stretch of tokens: the forward sweep (dq) from the states entry g.state of
// kv_in/z_in, the reverse sweep (dk, dv) from entry g.state of gkv_in/gz_in (either may be null: zero).
// Which sweeps backward_segment runs, and where it leaves the states it ends with (each may be null): S and z after
// the forward sweep (entry g.state of S_out [K x V], z_out [K]), dS and Z after the reverse one.
template <typename acc_t>
struct Sweeps {
  bool forward = true, reverse = true;
  acc_t *S_out = nullptr, *z_out = nullptr, *dS_out = nullptr, *zr_out = nullptr;
};

// Scratch of the backward's sweeps: a block's rows, then dq'/dk' [kBlockT x Kp] and dv [kBlockT x Vp].
template <typename acc_t>
int64_t sweep_scratch_size(const Problem& p) {
  return rows_scratch_size<acc_t>(p, kBlockT) + kBlockT * (p.Kp + p.Vp);
}

// The backward's forward sweep over tokens [g.tb, g.te) on the state S^T [Vp x Kp] and z [Kp], updated in place:
// dq'_t = dn_t S_t^T + dd_t z_t.
template <typename scalar_t>
void dq_sweep(const Problem& p, const Segment& g, const BackwardArgs<scalar_t>& a, at::opmath_type<scalar_t>* ST,
              at::opmath_type<scalar_t>* zs, at::opmath_type<scalar_t>* buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, Kp = p.Kp, Vp = p.Vp;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const BlockScratch<acc_t> s = rows_scratch(p, buf, kBlockT);
  acc_t* gk = buf + rows_scratch_size<acc_t>(p, kBlockT);
  int64_t row0, len;
  p.span(g.u, &row0, &len);
  for (int64_t t0 = g.tb; t0 < g.te; t0 += kBlockT) {
    const int64_t nb = std::min(kBlockT, g.te - t0), row = row0 + t0;
    const BlockRows<acc_t> r = load_backward_block(p, row, nb, a.q, a.k, a.v, a.go, a.o, a.den, s, false);
    scan(ST, r.v, r.dn, Vp, r.k, gk, Kp, nb, false, 0, Kp);
    for (int64_t t = 0; t < nb; ++t) {
      acc_t* gt = gk + t * Kp;
      if (p.normalize) {
        const acc_t ddt = r.dd[t];
#pragma omp simd
        for (int64_t i = 0; i < K; ++i) {
          zs[i] += r.k[t * Kp + i];
          gt[i] += ddt * zs[i];
        }
      }
      store_input_grad(gt, a.q + (row + t) * K, a.dq + (row + t) * K, K, p.fm, scale);
    }
  }
}

// The reverse sweep over tokens [g.tb, g.te), last token first, on dS [Kp x Vp], dS^T [Vp x Kp] and Z [Kp],
// updated in place: dv_t = dS_t^T k'_t, dk'_t = dS_t v_t + Z_t, with Z_t = grad_z + sum_{s>=t} q'_s dd_s tracked
// only when track_z (else it stays as it came in).
template <typename scalar_t>
void dkdv_sweep(const Problem& p, const Segment& g, const BackwardArgs<scalar_t>& a, at::opmath_type<scalar_t>* dS,
                at::opmath_type<scalar_t>* dST, at::opmath_type<scalar_t>* zr, bool track_z,
                at::opmath_type<scalar_t>* buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  const BlockScratch<acc_t> s = rows_scratch(p, buf, kBlockT);
  acc_t* gk = buf + rows_scratch_size<acc_t>(p, kBlockT);
  acc_t* gv = gk + kBlockT * Kp;
  int64_t row0, len;
  p.span(g.u, &row0, &len);
  for (int64_t t0 = g.tb + (g.te - g.tb - 1) / kBlockT * kBlockT; t0 >= g.tb && g.te > g.tb; t0 -= kBlockT) {
    const int64_t nb = std::min(kBlockT, g.te - t0), row = row0 + t0;
    const BlockRows<acc_t> r = load_backward_block(p, row, nb, a.q, a.k, a.v, a.go, a.o, a.den, s, true);
    acc_t* dvr = output_rows(a.dv + row * V, V, gv, Vp, false);
    scan(dS, r.q, r.k, Kp, r.dn, dvr, Vp, nb, true, 0, Vp);
    scan(dST, r.dn, r.v, Vp, r.q, gk, Kp, nb, true, 0, Kp);
    for (int64_t t = nb - 1; t >= 0; --t) {
      acc_t* gt = gk + t * Kp;
      if (track_z) {
        const acc_t ddt = r.dd[t];
#pragma omp simd
        for (int64_t i = 0; i < K; ++i) {
          zr[i] += r.q[t * Kp + i] * ddt;
          gt[i] += zr[i];
        }
      }
      store_input_grad(gt, a.k + (row + t) * K, a.dk + (row + t) * K, K, p.fm, acc_t(1));
      if (dvr == reinterpret_cast<acc_t*>(a.dv + row * V)) continue;
      scalar_t* dvt = a.dv + (row + t) * V;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) dvt[j] = static_cast<scalar_t>(gv[t * Vp + j]);
    }
  }
}

// Both sweeps of the backward over one stretch of tokens, with the states in this thread's scratch: the forward
// sweep from entry g.state of kv_in/z_in, the reverse sweep from entry g.state of gkv_in/gz_in (null: zero).
template <typename scalar_t>
void backward_segment(const Problem& p, const Segment& g, const BackwardArgs<scalar_t>& a,
                      const at::opmath_type<scalar_t>* kv_in, const at::opmath_type<scalar_t>* z_in,
                      const at::opmath_type<scalar_t>* gkv_in, const at::opmath_type<scalar_t>* gz_in,
                      at::opmath_type<scalar_t>* buf, const Sweeps<at::opmath_type<scalar_t>>& sw = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  acc_t* ST = buf + sweep_scratch_size<acc_t>(p);  // S_t^T
  acc_t* dS = ST + Kp * Vp;
  acc_t* dST = dS + Kp * Vp;
  acc_t* zs = dST + Kp * Vp;  // z_t, then the reverse sum Z_t
  acc_t* zr = zs + Kp;
  if (sw.forward) {
    load_state(kv_in, g.state, K, V, ST, Kp, Kp * Vp, true);
    load_vector(z_in, g.state, K, zs, Kp);
    dq_sweep<scalar_t>(p, g, a, ST, zs, buf);
    if (sw.S_out != nullptr) {
      acc_t* S = sw.S_out + g.state * K * V;
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < V; ++j) S[i * V + j] = ST[j * Kp + i];
      }
      std::copy(zs, zs + K, sw.z_out + g.state * K);
    }
  }
  if (!sw.reverse) return;
  load_state(gkv_in, g.state, K, V, dS, Vp, Kp * Vp, false);
  load_state(gkv_in, g.state, K, V, dST, Kp, Kp * Vp, true);
  load_vector(gz_in, g.state, K, zr, Kp);
  // Z_t is constant (grad_z) without normalize: dd = 0
  dkdv_sweep<scalar_t>(p, g, a, dS, dST, zr, p.normalize || gz_in != nullptr, buf);
  if (sw.dS_out != nullptr) {
    store_state(dS, Vp, sw.dS_out + g.state * K * V, K, V);
    std::copy(zr, zr + K, sw.zr_out + g.state * K);
  }
  if (g.first) {
    store_state(dS, Vp, a.dkv0 + g.u * K * V, K, V);
    std::copy(zr, zr + K, a.dz0 + g.u * K);
  }
}

// Pass (1) of the backward's reverse half: the sum over tokens [b, e) of unit u of q'_t dn_t^T into sS [K x V]
// and of q'_t dd_t into sz [K].
template <typename scalar_t>
void sum_qdn(const Problem& p, int64_t u, int64_t b, int64_t e, const BackwardArgs<scalar_t>& a,
             at::opmath_type<scalar_t>* sS, at::opmath_type<scalar_t>* sz, at::opmath_type<scalar_t>* buf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = p.K, V = p.V, Kp = p.Kp, Vp = p.Vp;
  const BlockScratch<acc_t> s = rows_scratch(p, buf, kBlockT);
  acc_t* M = s.dd + kBlockT;
  acc_t* zs = M + Kp * Vp;
  std::fill(M, M + Kp * Vp + Kp, acc_t(0));
  int64_t row0, len;
  p.span(u, &row0, &len);
  for (int64_t t0 = b; t0 < e; t0 += kBlockT) {
    const int64_t nb = std::min(kBlockT, e - t0), row = row0 + t0;
    const BlockRows<acc_t> r = load_backward_block(p, row, nb, a.q, a.k, a.v, a.go, a.o, a.den, s, true, false, false);
    accumulate(M, r.q, Kp, r.dn, Vp, nb);
    if (!p.normalize) continue;
    for (int64_t t = 0; t < nb; ++t) {
      const acc_t ddt = s.dd[t];
#pragma omp simd
      for (int64_t i = 0; i < Kp; ++i) zs[i] += r.q[t * Kp + i] * ddt;
    }
  }
  store_state(M, Vp, sS, K, V);
  std::copy(zs, zs + K, sz);
}

// The backward of units cut in two, on two threads per unit, with less extra work than the general split: each
// half can start one of its sweeps at once, and that sweep ends with the state the other half needs. With cuts
// 0 < b < c < T:
//   phase A: task 0 runs the forward sweep over [0, b), which ends with S_b, then sums q' dn^T over [b, c);
//            task 1 runs the reverse sweep over [c, T) from grad_kv, which ends with dS_c;
//   then dS_b = dS_c + that sum;
//   phase B: task 0 runs the reverse sweep over [0, b) from dS_b;
//            task 1 runs the reverse sweep over [b, c) from dS_c and the forward sweep over [b, T) from S_b.
// Per token a forward sweep costs one scan, a reverse sweep two, a sum sigma ~ 0.5-0.6 of a scan. Both tasks of
// each phase take equally long when b ~ 0.48 T and c ~ 0.70 T (phase A: b + sigma (c - b) = 2 (T - c); phase B:
// 2 b = 2 (c - b) + T - b), and the backward then takes ~1.56 T scans' time instead of 3 T: a speed-up of ~1.9,
// where the general split (two sums of T / 2 tokens, then both sweeps of each half) reaches 3 / (1.5 + sigma / 2)
// ~ 1.7. No pass waits on another inside a phase, so the tasks may run in any order on any number of threads.
constexpr double kCutB = 0.48, kCutC = 0.70;

bool two_phase_backward(const Problem& p, const Split& s) {
  if (forced_segment_length() != 0 || 2 * p.units > s.threads) return false;
  for (int64_t u = 0; u < p.units; ++u) {
    if (s.seg0[u + 1] - s.seg0[u] != 2) return false;
  }
  return true;
}

template <typename scalar_t>
void backward_two_phase(const Problem& p, const BackwardArgs<scalar_t>& a, int64_t scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t KV = p.K * p.V, K = p.K, U = p.units;
  std::vector<acc_t> Sb(U * KV), zb(U * K), dSc(U * KV), zrc(U * K), dSb(U * KV), zrb(U * K), sq(U * KV), sqz(U * K);
  std::vector<int64_t> cut_b(U), cut_c(U), lens(U);
  for (int64_t u = 0; u < U; ++u) {
    int64_t row0;
    p.span(u, &row0, &lens[u]);
    cut_b[u] = std::min(lens[u], std::max<int64_t>(kBlockT, round_up(static_cast<int64_t>(kCutB * lens[u]), kBlockT)));
    cut_c[u] = std::min(lens[u], std::max(cut_b[u], round_up(static_cast<int64_t>(kCutC * lens[u]), kBlockT)));
  }
  const bool track_z = p.normalize || a.gz != nullptr;
  at::parallel_for(0, 2 * U, 1, [&](int64_t begin, int64_t end) {
    acc_t* buf = thread_scratch<acc_t>(scratch);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / 2, b = cut_b[u], c = cut_c[u], len = lens[u];
      if (task % 2 == 0) {
        Sweeps<acc_t> sw;
        sw.reverse = false;
        sw.S_out = Sb.data();
        sw.z_out = zb.data();
        backward_segment<scalar_t>(p, Segment{u, 0, b, u, true, false}, a, a.kv0, a.z0, nullptr, nullptr, buf, sw);
        sum_qdn<scalar_t>(p, u, b, c, a, sq.data() + u * KV, sqz.data() + u * K, buf);
      } else {
        Sweeps<acc_t> sw;
        sw.forward = false;
        sw.dS_out = dSc.data();
        sw.zr_out = zrc.data();
        backward_segment<scalar_t>(p, Segment{u, c, len, u, false, true}, a, nullptr, nullptr, a.gkv, a.gz, buf, sw);
      }
    }
  });
  for (int64_t e = 0; e < U * KV; ++e) dSb[e] = dSc[e] + sq[e];
  for (int64_t e = 0; e < U * K; ++e) zrb[e] = zrc[e] + sqz[e];
  at::parallel_for(0, 2 * U, 1, [&](int64_t begin, int64_t end) {
    acc_t* buf = thread_scratch<acc_t>(scratch);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / 2, b = cut_b[u], c = cut_c[u], len = lens[u];
      Sweeps<acc_t> rev;
      rev.forward = false;
      if (task % 2 == 0) {
        backward_segment<scalar_t>(p, Segment{u, 0, b, u, true, false}, a, nullptr, nullptr, dSb.data(),
                                   track_z ? zrb.data() : nullptr, buf, rev);
      } else {
        backward_segment<scalar_t>(p, Segment{u, b, c, u, false, false}, a, nullptr, nullptr, dSc.data(),
                                   track_z ? zrc.data() : nullptr, buf, rev);
        Sweeps<acc_t> fwd;
        fwd.reverse = false;
        backward_segment<scalar_t>(p, Segment{u, b, len, u, false, true}, a, Sb.data(), zb.data(), nullptr, nullptr,
                                   buf, fwd);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Problem& p, const BackwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t scratch = backward_scratch_size<acc_t>(p);
  const Split s = make_split(p, false);
  if (!s.segmented()) {
    at::parallel_for(0, p.units, 1, [&](int64_t begin, int64_t end) {
      acc_t* buf = thread_scratch<acc_t>(scratch);
      for (int64_t u = begin; u < end; ++u) {
        int64_t row0, len;
        p.span(u, &row0, &len);
        backward_segment<scalar_t>(p, Segment{u, 0, len, u, true, true}, a, a.kv0, a.z0, a.gkv, a.gz, buf);
      }
    });
    return;
  }
  if (two_phase_backward(p, s)) {
    backward_two_phase<scalar_t>(p, a, scratch);
    return;
  }
  const int64_t KV = p.K * p.V, stride = KV + p.K, n_seg = static_cast<int64_t>(s.segs.size());
  // Forward-half sums in sums[0 .. n_pieces), reverse-half sums after them.
  std::vector<acc_t> sums(static_cast<size_t>(2 * s.n_pieces * stride));
  std::vector<acc_t> kv_in(static_cast<size_t>(n_seg * KV)), z_in(static_cast<size_t>(n_seg * p.K));
  std::vector<acc_t> gkv_in(static_cast<size_t>(n_seg * KV)), gz_in(static_cast<size_t>(n_seg * p.K));
  // (1) per piece: the k' v^T sums where a later segment needs them, the q' dn^T sums where an earlier one does.
  at::parallel_for(0, s.n_pieces, 1, [&](int64_t begin, int64_t end) {
    acc_t* buf = thread_scratch<acc_t>(scratch);
    int64_t g = 0;
    for (int64_t j = begin; j < end; ++j) {
      while (s.pieces[g + 1] <= j) ++g;
      const Segment& seg = s.segs[g];
      int64_t b, e;
      piece_range(s, seg, j - s.pieces[g], &b, &e);
      acc_t* fw = sums.data() + j * stride;
      acc_t* rv = sums.data() + (s.n_pieces + j) * stride;
      if (!seg.last) sum_kv<scalar_t>(p, seg.u, b, e, a.k, a.v, fw, fw + KV, buf);
      if (!seg.first) sum_qdn<scalar_t>(p, seg.u, b, e, a, rv, rv + KV, buf);
    }
  });
  // (2) prefix and suffix; (3) every segment's two sweeps from its states.
  prefix_states(p, s, sums.data(), a.kv0, a.z0, kv_in.data(), z_in.data(), false);
  prefix_states(p, s, sums.data() + s.n_pieces * stride, a.gkv, a.gz, gkv_in.data(), gz_in.data(), true);
  const acc_t* gz_seg = (p.normalize || a.gz != nullptr) ? gz_in.data() : nullptr;
  at::parallel_for(0, n_seg, 1, [&](int64_t begin, int64_t end) {
    acc_t* buf = thread_scratch<acc_t>(scratch);
    for (int64_t g = begin; g < end; ++g) {
      backward_segment<scalar_t>(p, s.segs[g], a, kv_in.data(), z_in.data(), gkv_in.data(), gz_seg, buf);
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

// The allocator of the large per-token outputs (o, dq, dk, dv): blocks freed by their tensors are kept for the
// next call that asks for the same size (within 1/8) instead of going back to the system. A fresh block of tens of
// MB costs a page fault per 4 KiB page on its first write (glibc returns blocks of 32 MB and more to the system on
// free, so every call of a training loop would fault its outputs in again); reused, it costs nothing. At most
// FASTML_CPU_CACHE_MB (default 1024) MB are kept idle; 0 turns the reuse off. Blocks under 1 MB go to torch's own
// allocator. The tensors are ordinary resizable CPU tensors.
class ReuseAllocator final : public c10::Allocator {
 public:
  static ReuseAllocator* get() {
    static ReuseAllocator* a = new ReuseAllocator();  // never destroyed: tensors may outlive static destruction
    return a;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || cap_ == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kGranule - 1) / kGranule * kGranule;
    void* ptr = take(bytes);
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(64, bytes);
      TORCH_CHECK(ptr != nullptr, "fastml: out of memory allocating ", bytes, " bytes");
    }
    return {ptr, new Block{ptr, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  static constexpr size_t kMinBytes = size_t(1) << 20, kGranule = size_t(1) << 16;

  ReuseAllocator() {
    const char* env = std::getenv("FASTML_CPU_CACHE_MB");
    long long mb = 1024;
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      mb = std::strtoll(env, &end, 10);
      if (end == nullptr || *end != '\0' || mb < 0) mb = 1024;
    }
    cap_ = static_cast<size_t>(mb) << 20;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = idle_.lower_bound(bytes);
    if (it == idle_.end() || it->first > bytes + bytes / 8) return nullptr;
    void* ptr = it->second.ptr;
    idle_bytes_ -= it->first;
    idle_.erase(it);
    return ptr;
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    ReuseAllocator* self = get();
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      if (self->idle_bytes_ + b->bytes <= self->cap_) {
        self->idle_bytes_ += b->bytes;
        self->idle_.emplace(b->bytes, *b);
        delete b;
        return;
      }
    }
    std::free(b->ptr);
    delete b;
  }

  std::mutex mu_;
  std::multimap<size_t, Block> idle_;
  size_t idle_bytes_ = 0;
  size_t cap_ = 0;
};

// An uninitialized contiguous tensor of like's shape and dtype from ReuseAllocator.
Tensor empty_output(const Tensor& like) {
  return at::detail::empty_generic(like.sizes(), ReuseAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), std::nullopt);
}

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
  p.lanes = q.scalar_type() == at::kDouble ? kLanes<double> : kLanes<float>;
  const int64_t pad = std::max<int64_t>(kRowStep, p.lanes);
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
  Tensor o = empty_output(v);
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

// The backward's inputs, checked and made contiguous, shared by linear_attention_bwd and _bwd_sweep.
struct BackwardInputs {
  Tensor go, q, k, v, o, den, cu, gkv, gz, kv0, z0;
  Problem p;
  int64_t N;
  at::ScalarType st;
};

BackwardInputs backward_inputs(const Tensor& go_in, const std::optional<Tensor>& gkv_in,
                               const std::optional<Tensor>& gz_in, const Tensor& q_in, const Tensor& k_in,
                               const Tensor& v_in, const Tensor& o_in, const Tensor& den_in,
                               const std::optional<Tensor>& kv0_in, const std::optional<Tensor>& z0_in,
                               const std::optional<Tensor>& cu_seqlens, int64_t feature_map, bool normalize,
                               double eps, double scale) {
  check_inputs(q_in, k_in, v_in, feature_map);
  BackwardInputs b;
  b.q = q_in.contiguous();
  b.k = k_in.contiguous();
  b.v = v_in.contiguous();
  TORCH_CHECK(go_in.sizes() == b.v.sizes() && o_in.sizes() == b.v.sizes(),
              "fastml::linear_attention_bwd: grad_o and o must have v's shape");
  TORCH_CHECK(go_in.scalar_type() == b.q.scalar_type() && o_in.scalar_type() == b.q.scalar_type(),
              "fastml::linear_attention_bwd: grad_o and o must have q's dtype");
  b.go = go_in.contiguous();
  b.o = o_in.contiguous();
  b.cu = checked_cu_seqlens(cu_seqlens, b.q);
  b.p = make_problem(b.q, b.v, b.cu, feature_map, normalize, eps, scale);
  b.N = num_sequences(b.q, b.cu);
  b.st = state_type(b.q);
  const Problem& p = b.p;
  TORCH_CHECK(den_in.sizes() == at::IntArrayRef({b.q.size(0), p.H, p.T}) && den_in.scalar_type() == b.st,
              "fastml::linear_attention_bwd: den must be [B, H, T] in the state dtype");
  b.den = den_in.contiguous();
  b.gkv = optional_state(gkv_in, {b.N, p.H, p.K, p.V}, b.st, "grad_kv");
  b.gz = optional_state(gz_in, {b.N, p.H, p.K}, b.st, "grad_z");
  b.kv0 = optional_state(kv0_in, {b.N, p.H, p.K, p.V}, b.st, "kv0");
  b.z0 = optional_state(z0_in, {b.N, p.H, p.K}, b.st, "z0");
  return b;
}

template <typename scalar_t>
BackwardArgs<scalar_t> backward_args(const BackwardInputs& b, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dkv0,
                                     Tensor& dz0) {
  using acc_t = at::opmath_type<scalar_t>;
  BackwardArgs<scalar_t> a{};
  a.go = b.go.const_data_ptr<scalar_t>();
  a.q = b.q.const_data_ptr<scalar_t>();
  a.k = b.k.const_data_ptr<scalar_t>();
  a.v = b.v.const_data_ptr<scalar_t>();
  a.o = b.o.const_data_ptr<scalar_t>();
  a.gkv = ptr_or_null<acc_t>(b.gkv);
  a.gz = ptr_or_null<acc_t>(b.gz);
  a.den = b.den.const_data_ptr<acc_t>();
  a.kv0 = ptr_or_null<acc_t>(b.kv0);
  a.z0 = ptr_or_null<acc_t>(b.z0);
  a.dq = dq.numel() > 0 ? dq.data_ptr<scalar_t>() : nullptr;
  a.dk = dk.numel() > 0 ? dk.data_ptr<scalar_t>() : nullptr;
  a.dv = dv.numel() > 0 ? dv.data_ptr<scalar_t>() : nullptr;
  a.dkv0 = dkv0.numel() > 0 ? dkv0.data_ptr<acc_t>() : nullptr;
  a.dz0 = dz0.numel() > 0 ? dz0.data_ptr<acc_t>() : nullptr;
  return a;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attention_bwd(
    const Tensor& go_in, const std::optional<Tensor>& gkv_in, const std::optional<Tensor>& gz_in,
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& o_in, const Tensor& den_in,
    const std::optional<Tensor>& kv0_in, const std::optional<Tensor>& z0_in,
    const std::optional<Tensor>& cu_seqlens, int64_t feature_map, bool normalize, double eps, double scale) {
  const BackwardInputs b = backward_inputs(go_in, gkv_in, gz_in, q_in, k_in, v_in, o_in, den_in, kv0_in, z0_in,
                                           cu_seqlens, feature_map, normalize, eps, scale);
  const Problem& p = b.p;
  Tensor dq = empty_output(b.q), dk = empty_output(b.k), dv = empty_output(b.v);
  Tensor dkv0 = at::empty({b.N, p.H, p.K, p.V}, b.q.options().dtype(b.st));
  Tensor dz0 = at::empty({b.N, p.H, p.K}, b.q.options().dtype(b.st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.q.scalar_type(), "linear_attention_bwd", [&] {
    backward_kernel<scalar_t>(p, backward_args<scalar_t>(b, dq, dk, dv, dkv0, dz0));
  });
  return {dq, dk, dv, dkv0, dz0};
}

// One sweep of the backward: sweep 0 the forward one (dq; the other results are empty), sweep 1 the reverse one
// (dk, dv, dkv0, dz0; dq is empty). For a caller that has work to overlap between them (the sequence-parallel op
// runs dq while the final state's gradient is still on its way). Parallel over (sequence, head) units only.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attention_bwd_sweep(
    const Tensor& go_in, const std::optional<Tensor>& gkv_in, const std::optional<Tensor>& gz_in,
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& o_in, const Tensor& den_in,
    const std::optional<Tensor>& kv0_in, const std::optional<Tensor>& z0_in, int64_t feature_map, bool normalize,
    double eps, double scale, int64_t sweep) {
  TORCH_CHECK_VALUE(sweep == 0 || sweep == 1, "fastml::linear_attention_bwd_sweep: sweep must be 0 or 1, got ",
                    sweep);
  const BackwardInputs b = backward_inputs(go_in, gkv_in, gz_in, q_in, k_in, v_in, o_in, den_in, kv0_in, z0_in,
                                           std::nullopt, feature_map, normalize, eps, scale);
  const Problem& p = b.p;
  const bool fwd = sweep == 0;
  const at::TensorOptions so = b.q.options().dtype(b.st);
  Tensor dq = fwd ? empty_output(b.q) : at::empty({0}, b.q.options());
  Tensor dk = fwd ? at::empty({0}, b.q.options()) : empty_output(b.k);
  Tensor dv = fwd ? at::empty({0}, b.q.options()) : empty_output(b.v);
  Tensor dkv0 = fwd ? at::empty({0}, so) : at::empty({b.N, p.H, p.K, p.V}, so);
  Tensor dz0 = fwd ? at::empty({0}, so) : at::empty({b.N, p.H, p.K}, so);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.q.scalar_type(), "linear_attention_bwd_sweep", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t> a = backward_args<scalar_t>(b, dq, dk, dv, dkv0, dz0);
    const int64_t scratch = backward_scratch_size<acc_t>(p);
    at::parallel_for(0, p.units, 1, [&](int64_t begin, int64_t end) {
      acc_t* buf = thread_scratch<acc_t>(scratch);
      for (int64_t u = begin; u < end; ++u) {
        int64_t row0, len;
        p.span(u, &row0, &len);
        Sweeps<acc_t> sw;
        sw.forward = fwd;
        sw.reverse = !fwd;
        backward_segment<scalar_t>(p, Segment{u, 0, len, u, true, true}, a, a.kv0, a.z0, a.gkv, a.gz, buf, sw);
      }
    });
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

// ---- the state sums of whole sequences (for the sequence-parallel op) ----
//
// fastml::linear_attention_kv_sum: kv = sum_t k'_t v_t^T [B, H, K, V] and z = sum_t k'_t [B, H, K], what a slice of
// a sequence adds to the state (sum_kv, as in pass (1) of the segment split). fastml::linear_attention_start_grad:
// the gradient of the slice's outputs with respect to the state it started from, dkv = sum_t q'_t dn_t^T and
// dz = sum_t q'_t dd_t (sum_qdn), which needs no scan. Both sum per (batch, head) unit; with fewer units than
// threads each unit's tokens are cut into pieces of at least kMinSegment tokens, summed apart and then added.
template <typename acc_t, typename F>
void unit_sums(const Problem& p, int64_t scratch, acc_t* kv, acc_t* z, F sum) {
  const int64_t KV = p.K * p.V, stride = KV + p.K, threads = at::get_num_threads();
  const int64_t pieces = p.units >= threads ? 1
                                            : std::max<int64_t>(1, std::min((threads + p.units - 1) / p.units,
                                                                            p.T / kMinSegment));
  const int64_t step = round_up((p.T + pieces - 1) / pieces, kBlockT);
  std::vector<acc_t> sums(static_cast<size_t>(pieces > 1 ? p.units * pieces * stride : 0));
  at::parallel_for(0, p.units * pieces, 1, [&](int64_t begin, int64_t end) {
    acc_t* buf = thread_scratch<acc_t>(scratch);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t u = w / pieces, j = w % pieces;
      const int64_t b = std::min(p.T, j * step), e = std::min(p.T, (j + 1) * step);
      acc_t* sS = pieces > 1 ? sums.data() + w * stride : kv + u * KV;
      acc_t* sz = pieces > 1 ? sums.data() + w * stride + KV : z + u * p.K;
      sum(u, b, e, sS, sz, buf);
    }
  });
  if (pieces == 1) return;
  for (int64_t u = 0; u < p.units; ++u) {
    std::fill(kv + u * KV, kv + (u + 1) * KV, acc_t(0));
    std::fill(z + u * p.K, z + (u + 1) * p.K, acc_t(0));
    for (int64_t j = 0; j < pieces; ++j) {
      const acc_t* src = sums.data() + (u * pieces + j) * stride;
      for (int64_t e = 0; e < KV; ++e) kv[u * KV + e] += src[e];
      for (int64_t e = 0; e < p.K; ++e) z[u * p.K + e] += src[KV + e];
    }
  }
}

std::tuple<Tensor, Tensor> linear_attention_kv_sum(const Tensor& k_in, const Tensor& v_in, int64_t feature_map) {
  check_inputs(k_in, k_in, v_in, feature_map);
  const Tensor k = k_in.contiguous(), v = v_in.contiguous();
  const Problem p = make_problem(k, v, Tensor(), feature_map, false, 0.0, 1.0);
  const at::ScalarType st = state_type(k);
  Tensor kv = at::empty({k.size(0), p.H, p.K, p.V}, k.options().dtype(st));
  Tensor z = at::empty({k.size(0), p.H, p.K}, k.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "linear_attention_kv_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    unit_sums<acc_t>(p, forward_scratch_size<acc_t>(p), kv.data_ptr<acc_t>(), z.data_ptr<acc_t>(),
                     [&](int64_t u, int64_t b, int64_t e, acc_t* sS, acc_t* sz, acc_t* buf) {
                       sum_kv<scalar_t>(p, u, b, e, kp, vp, sS, sz, buf);
                     });
  });
  return {kv, z};
}

std::tuple<Tensor, Tensor> linear_attention_start_grad(const Tensor& go_in, const Tensor& q_in, const Tensor& o_in,
                                                       const Tensor& den_in, int64_t feature_map, bool normalize,
                                                       double scale) {
  TORCH_CHECK(q_in.dim() == 4 && go_in.dim() == 4, "fastml::linear_attention_start_grad: q, grad_o must be 4-D");
  TORCH_CHECK(go_in.size(0) == q_in.size(0) && go_in.size(1) == q_in.size(1) && go_in.size(2) == q_in.size(2),
              "fastml::linear_attention_start_grad: grad_o must be [B, H, T, V] with q's B, H, T");
  TORCH_CHECK(o_in.sizes() == go_in.sizes(), "fastml::linear_attention_start_grad: o must have grad_o's shape");
  TORCH_CHECK(go_in.scalar_type() == q_in.scalar_type() && o_in.scalar_type() == q_in.scalar_type(),
              "fastml::linear_attention_start_grad: grad_o and o must have q's dtype");
  TORCH_CHECK(feature_map >= 0 && feature_map <= 2,
              "fastml::linear_attention_start_grad: feature_map must be 0, 1 or 2");
  const Tensor q = q_in.contiguous(), go = go_in.contiguous(), o = o_in.contiguous();
  const Problem p = make_problem(q, go, Tensor(), feature_map, normalize, 0.0, scale);
  const at::ScalarType st = state_type(q);
  TORCH_CHECK(den_in.sizes() == at::IntArrayRef({q.size(0), p.H, p.T}) && den_in.scalar_type() == st,
              "fastml::linear_attention_start_grad: den must be [B, H, T] in the state dtype");
  const Tensor den = den_in.contiguous();
  Tensor dkv = at::empty({q.size(0), p.H, p.K, p.V}, q.options().dtype(st));
  Tensor dz = at::empty({q.size(0), p.H, p.K}, q.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_start_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a{};
    a.go = go.const_data_ptr<scalar_t>();
    a.q = q.const_data_ptr<scalar_t>();
    a.o = o.const_data_ptr<scalar_t>();
    a.den = den.const_data_ptr<acc_t>();
    unit_sums<acc_t>(p, backward_scratch_size<acc_t>(p), dkv.data_ptr<acc_t>(), dz.data_ptr<acc_t>(),
                     [&](int64_t u, int64_t b, int64_t e, acc_t* sS, acc_t* sz, acc_t* buf) {
                       sum_qdn<scalar_t>(p, u, b, e, a, sS, sz, buf);
                     });
  });
  return {dkv, dz};
}

}  // namespace
}  // namespace fastml

TORCH_LIBRARY_IMPL(fastml, CPU, m) {
  m.impl("linear_attention_fwd", &fastml::linear_attention_fwd);
  m.impl("linear_attention_bwd", &fastml::linear_attention_bwd);
  m.impl("linear_attention_step", &fastml::linear_attention_step);
  m.impl("linear_attention_kv_sum", &fastml::linear_attention_kv_sum);
  m.impl("linear_attention_start_grad", &fastml::linear_attention_start_grad);
  m.impl("linear_attention_bwd_sweep", &fastml::linear_attention_bwd_sweep);
}
