// The ff_kernels_ext operator library: every schema in one place. The CPU implementation is in cpu/step_cpu.cpp,
// the CUDA one in cuda/step_cuda.cpp (built only with nvcc); the fake (meta) implementations for torch.compile are
// registered in Python, in the module named below.
//
// Ops (all hyper-parameters explicit; loss in {"logistic", "symba"}, normalize in {"l2", "rms", "none"}):
//   forward    -> (h, g)                                  inference: GEMM 1 and the goodness
//   step       -> (loss, g, h, grad_w, grad_b)            grad_b is empty when b is None
//   step_sgd_  -> (loss, g, h)                            updates w, b and the momentum buffers in place
//   step_adam_ -> (loss, g, h)                            updates w, b, exp_avg and exp_avg_sq in place
// g and h are stacked over the P positive then Q negative rows.
#include <Python.h>
#include <torch/library.h>

#ifndef FF_KERNELS_WITH_CUDA
#define FF_KERNELS_WITH_CUDA 0
#endif

namespace {
bool with_cuda() { return FF_KERNELS_WITH_CUDA != 0; }
}  // namespace

#define FFK_STEP_ARGS                                                                                   \
  "Tensor? offset_pos, Tensor? offset_neg, float threshold, float kappa, str loss, str normalize, float eps, " \
  "float alpha, bool allow_tf32"

TORCH_LIBRARY(ff_kernels_ext, m) {
  m.set_python_module("ff_kernels.ops.cuda_step");
  m.def("with_cuda() -> bool", &with_cuda);
  m.def("forward(Tensor x, Tensor w, Tensor? b, float kappa, str normalize, float eps, bool allow_tf32) "
        "-> (Tensor, Tensor)");
  m.def("step(Tensor x_pos, Tensor x_neg, Tensor w, Tensor? b, " FFK_STEP_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("step_sgd_(Tensor x_pos, Tensor x_neg, Tensor(a!) w, Tensor(b!)? b, " FFK_STEP_ARGS
        ", Tensor(c!)? buf_w, Tensor(d!)? buf_b, float lr, float momentum, float dampening, float weight_decay, "
        "bool nesterov, bool first_w, bool first_b) -> (Tensor, Tensor, Tensor)");
  m.def("step_adam_(Tensor x_pos, Tensor x_neg, Tensor(a!) w, Tensor(b!)? b, " FFK_STEP_ARGS
        ", Tensor(c!) exp_avg_w, Tensor(d!) exp_avg_sq_w, Tensor(e!)? exp_avg_b, Tensor(f!)? exp_avg_sq_b, "
        "float lr, float beta1, float beta2, float adam_eps, float weight_decay, bool decoupled, "
        "float step_size_w, float bc2_sqrt_w, float step_size_b, float bc2_sqrt_b) -> (Tensor, Tensor, Tensor)");
}

// `import ff_kernels._C` loads this library (running the registrations above); the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ff_kernels_ext operators (see torch.ops.ff_kernels_ext)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
