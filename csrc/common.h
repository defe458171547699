// Pieces shared by the CPU kernels: a SIMD vector type the compiler maps onto the widest registers of the target
// it compiles for (setup.py: FASTML_CPU_ARCH, -march=native by default), and 64-byte aligned scratch memory for the
// kernels' per-thread working sets.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace fastml {

// One vector is one register of the widest kind the target has, read from the compiler's predefined macros (never
// assumed: a vector wider than the target's registers would be split into several, and one the target lacks would
// not run): a zmm with AVX-512, a ymm with AVX/AVX2, else 16 bytes (xmm on x86-64, q registers with NEON, and
// what GCC emulates elsewhere). kVecRegs is how many of them there are, which sizes the register-blocked
// micro-kernel (la_cpu::kRowTile) so that it does not spill.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#elif defined(__aarch64__) || defined(__ARM_NEON)
constexpr int kVecBytes = 16;
constexpr int kVecRegs = 32;
#else
constexpr int kVecBytes = 16;
constexpr int kVecRegs = 16;
#endif

// GCC/Clang vector extension: element-wise arithmetic (scalar operands broadcast) compiles to SIMD
// instructions, with fused multiply-adds where the target has them. may_alias and element alignment: kernels
// load vectors straight from arrays of T, including tensors' rows, which need not be vector aligned.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes), may_alias, aligned(sizeof(T))));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = kVecBytes / static_cast<int64_t>(sizeof(T));

// The 32-bit finalizer of the counter-based random numbers (the definition is fastml/_random.py). Forced inline:
// the loops that call it vectorize only when it is.
__attribute__((always_inline)) inline uint32_t counter_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Uninitialized, 64-byte aligned array of n elements (one cache line; also the alignment Vec loads need).
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : ptr_(static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(round_up(
                                                        (n > 0 ? n : 1) * static_cast<int64_t>(sizeof(T)), 64))))) {
    TORCH_CHECK(ptr_ != nullptr, "fastml: out of memory allocating ", n * static_cast<int64_t>(sizeof(T)),
                " bytes of scratch");
  }
  ~AlignedBuffer() { std::free(ptr_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data() const { return ptr_; }

 private:
  T* ptr_;
};

// exp(x) for x <= 0 (and NaN, which it returns), written so that loops over it vectorize: std::exp is a
// library call that stops GCC from vectorizing (it only maps it to a SIMD variant under -ffast-math). Range
// reduction x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that n ln2 is exact), a Taylor polynomial for
// exp(r) accurate to about an ulp, and 2^n built from its exponent bits. Inputs below the smallest normal result
// are clamped there (the error is below 1e-37 in float, 1e-307 in double).
template <typename T>
struct ExpConsts;
template <>
struct ExpConsts<float> {
  using Bits = int32_t;
  static constexpr float kLo = -87.0f, kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr int kDegree = 7, kMantissa = 23, kBias = 127;
};
template <>
struct ExpConsts<double> {
  using Bits = int64_t;
  static constexpr double kLo = -708.0, kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr int kDegree = 13, kMantissa = 52, kBias = 1023;
};

template <typename T>
constexpr T inverse_factorial(int n) {
  T f = T(1);
  for (int i = 2; i <= n; ++i) f /= T(i);
  return f;
}

template <typename T>
inline T exp_nonpositive(T x) {
  using C = ExpConsts<T>;
  using Bits = typename C::Bits;
  x = x < C::kLo ? C::kLo : x;  // NaN compares false and passes through
  const T y = x * T(1.4426950408889634) + C::kMagic;
  const T n = y - C::kMagic;
  const T r = (x - n * C::kLn2Hi) - n * C::kLn2Lo;
  T p = inverse_factorial<T>(C::kDegree);
#pragma GCC unroll 16
  for (int i = C::kDegree - 1; i >= 0; --i) p = p * r + inverse_factorial<T>(i);
  Bits yb, nb;
  std::memcpy(&yb, &y, sizeof(T));
  const T magic = C::kMagic;
  std::memcpy(&nb, &magic, sizeof(T));
  const Bits sb = (yb - nb + C::kBias) << C::kMantissa;
  T scale;
  std::memcpy(&scale, &sb, sizeof(T));
  return p * scale;
}

// exp(x) for x <= 0, exactly 0 below the smallest normal result (so exp(-inf) = 0: a masked class gets no
// probability and no gradient). NaN passes through.
template <typename T>
inline T exp_or_zero(T x) {
  const T e = exp_nonpositive(x);
  return x < ExpConsts<T>::kLo ? T(0) : e;
}

}  // namespace fastml
