// Every fastml op schema, declared once. Implementations register under their dispatch keys in
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>_binding.cpp (CUDA); fake (meta) implementations live in Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastml, m) {
  // Causal linear attention. feature_map: 0 = identity, 1 = elu+1, 2 = relu (applied in the kernel; a callable
  // map is applied in Python before the call, which then passes 0). q,k [B,H,T,K], v [B,H,T,V]; kv0 [N,H,K,V]
  // and z0 [N,H,K] in the state dtype (float32, float64 for float64 inputs); cu_seqlens [N+1] int64 or None
  // (then N = B). Returns o [B,H,T,V] (input dtype), the final state kv [N,H,K,V], z [N,H,K] and the
  // normalizer den [B,H,T] = q'.z_t + eps (state dtype), which the backward reuses.
  m.def(
      "linear_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? kv0, Tensor? z0, Tensor? cu_seqlens, "
      "int feature_map, bool normalize, float eps, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients for raw q, k (through the feature map and scale), v, and the initial state. grad_kv/grad_z are the
  // gradients of the returned final state (None when it was not used). dkv0/dz0 are always returned.
  m.def(
      "linear_attention_bwd(Tensor grad_o, Tensor? grad_kv, Tensor? grad_z, Tensor q, Tensor k, Tensor v, "
      "Tensor o, Tensor den, Tensor? kv0, Tensor? z0, Tensor? cu_seqlens, int feature_map, bool normalize, "
      "float eps, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One decode step: q,k [B,H,K], v [B,H,V], kv [B,H,K,V], z [B,H,K] -> (o [B,H,V], kv', z'). Functional.
  m.def(
      "linear_attention_step(Tensor q, Tensor k, Tensor v, Tensor kv, Tensor z, int feature_map, "
      "bool normalize, float eps, float scale) -> (Tensor, Tensor, Tensor)");

  // Integrated-gradients path kernels. inputs [B, ...]; baselines expanded to inputs' shape; alphas [S].
  // scale: out[s*B + b] = baselines[b] + alphas[s] * (inputs[b] - baselines[b]), step-major as Captum.
  m.def("ig_scale_inputs(Tensor inputs, Tensor baselines, Tensor alphas) -> Tensor");
  // accumulate: grads [S*B, ...], weights [S], acc [B, ...] or None (a running sum from earlier chunks of steps):
  //   total[b] = acc[b] + sum_s weights[s] * grads[s*B + b], accumulated in float32 (float64 for float64 grads);
  //   attr = total * (inputs - baselines) if multiply_by_inputs else total   (float32 / float64);
  //   sums [B] = attr summed over all dims but the first (for the convergence delta). Returns (attr, sums).
  m.def(
      "ig_accumulate(Tensor grads, Tensor inputs, Tensor baselines, Tensor weights, bool multiply_by_inputs, "
      "Tensor? acc) -> (Tensor, Tensor)");
}

// fastml._C is imported from Python only to load the op registrations above; it defines no Python functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
