// The element types the fastml CUDA launchers take, named without torch.
#pragma once

namespace fastml_cuda {

enum class DType { f32, f16, bf16, f64 };

}  // namespace fastml_cuda
