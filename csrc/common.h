// Pieces shared by the CPU kernels: a SIMD vector type the compiler maps onto the widest registers it was told
// about (-march=native), and 64-byte aligned scratch memory for the kernels' per-thread working sets.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>

namespace fastml {

// With AVX-512 one vector is a zmm register; elsewhere half of that, so that a register-blocked micro-kernel
// sized for 32 vector registers does not spill on 16-register (AVX2) machines.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

// GCC/Clang vector extension: element-wise arithmetic (scalar operands broadcast) compiles to SIMD
// instructions, with fused multiply-adds where the target has them. may_alias: kernels load vectors from
// arrays of T.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes), may_alias));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = kVecBytes / static_cast<int64_t>(sizeof(T));

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

}  // namespace fastml
