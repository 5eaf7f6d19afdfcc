// The ff_kernels_ext operator library: every schema in one place. The CPU implementation is in cpu/step_cpu.cpp,
// the CUDA one in cuda/step_cuda.cpp (built only with nvcc); the fake (meta) implementations for torch.compile are
// registered in Python, in the module named below.
//
// Ops (all hyper-parameters explicit; loss in {"logistic", "symba"}, normalize in {"l2", "rms", "none"}):
//   forward    -> (h, g)                                  inference: GEMM 1 and the goodness
//   step       -> (loss, g, h, grad_w, grad_b)            grad_b is empty when b is None
//   step_sgd_  -> (loss, g, h)                            updates w, b and the momentum buffers in place
//   step_adam_ -> (loss, g, h)                            updates w, b, exp_avg and exp_avg_sq in place
//   plan_grad  -> [cfg, tile_n, tile_k, tiles, split, programs, split_workspace_bytes]
//                 the CUDA GEMM 2 launch plan (cuda/plan.h) for M rows, W (N, K), `sms` SMs, dtype 0 = fp32,
//                 1 = fp16, 2 = bf16, and `resident` cfg-1 blocks per SM: host code, tested without a GPU
// g and h are stacked over the P positive then Q negative rows.
//
// CPU only (cpu/step_cpu.cpp): what backend="cuda" runs for CPU tensors, the fused CPU step. One call holds the
// whole step, the finiteness check of the inputs and offsets included (fused into the first pass over x, raising
// ValueError before anything is written); the GEMMs run in compute_dtype with the parameters in their own dtype.
//   cpu_step_   -> (loss, g_pos, g_neg, h, grad_w, grad_b), no output a view of another (h is stacked, as above)
//                  optimizer 0: none (the gradients are returned; grad_b is empty without b); 1: SGD,
//                  hyper = [lr, momentum, dampening, weight_decay, nesterov, first_w, first_b], state = [] or the
//                  momentum buffers [buf_w(, buf_b)]; 2: Adam/AdamW, hyper = [lr, beta1, beta2, eps, weight_decay,
//                  decoupled, step_size_w, bc2_sqrt_w, step_size_b, bc2_sqrt_b], state = [exp_avg_w, exp_avg_sq_w(,
//                  exp_avg_b, exp_avg_sq_b)]. With an optimizer w, b and state are updated in place and the
//                  gradients come back empty.
//   cpu_forward -> (h, g)
//   cpu_group_goodness -> (B, groups): kappa times the sum of h^2 over each channel group and position of h, (B, C)
//                  rows or (B, C, H, W) channels-last images, in fp32 (fp64 for fp64): the conv steps' goodness
//   cpu_kernels -> the CPU capability the fused passes run with here (ATen's: "AVX512", "AVX2" or "DEFAULT";
//                  "AVX512_BF16" for AVX512 on a CPU with AVX512-BF16)
//   cpu_mm      -> a b through the CPU step's GEMM (cpu/gemm.h), for the benchmarks' floor of the fused path
//   cpu_gemm_library -> the library the CPU step's fp32 GEMMs run in here: "onednn" or "aten" (cpu/gemm.h)
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cuda/plan.h"

#ifndef FF_KERNELS_WITH_CUDA
#define FF_KERNELS_WITH_CUDA 0
#endif

namespace {
bool with_cuda() { return FF_KERNELS_WITH_CUDA != 0; }

std::string cpu_kernels() { return ffk::cpu::kernels().capability; }

std::vector<int64_t> plan_grad_op(int64_t M, int64_t N, int64_t K, int64_t sms, int64_t dtype, int64_t resident) {
  TORCH_CHECK(M >= 0 && N >= 0 && K >= 0 && sms >= 1 && sms <= (1 << 16) && resident >= 1 && resident <= 64,
              "plan_grad: M, N, K >= 0, 1 <= sms <= 65536 and 1 <= resident <= 64");
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "plan_grad: dtype is 0 (fp32), 1 (fp16) or 2 (bf16); got ", dtype);
  namespace planner = ffk::planner;
  const planner::GradPlan g = planner::plan_grad(M, N, K, static_cast<int>(sms), static_cast<ffk::DType>(dtype),
                                                     static_cast<int>(resident));
  const planner::SplitWorkspace ws = planner::split_workspace(N, K, g.cfg, g.split);
  return {g.cfg, planner::kTiles[g.cfg].m, planner::kTiles[g.cfg].n, g.tiles, g.split, g.programs(),
          static_cast<int64_t>(ws.weight_bytes + ws.bias_bytes + ws.ticket_bytes)};
}
}  // namespace

#define FFK_STEP_ARGS                                                                                   \
  "Tensor? offset_pos, Tensor? offset_neg, float threshold, float kappa, str loss, str normalize, float eps, " \
  "float alpha, bool allow_tf32"

TORCH_LIBRARY(ff_kernels_ext, m) {
  m.set_python_module("ff_kernels.ops.cuda_step");
  m.def("with_cuda() -> bool", &with_cuda);
  m.def("plan_grad(int M, int N, int K, int sms, int dtype, int resident=1) -> int[]", &plan_grad_op);
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
  m.def("cpu_step_(Tensor x_pos, Tensor x_neg, Tensor(a!) w, Tensor(b!)? b, Tensor? offset_pos, Tensor? offset_neg, "
        "float threshold, float kappa, str loss, str normalize, float eps, float alpha, ScalarType compute_dtype, "
        "bool check_finite, int optimizer, Tensor(c!)[] state, float[] hyper) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_forward(Tensor x, Tensor w, Tensor? b, float kappa, str normalize, float eps, ScalarType compute_dtype, "
        "bool check_finite) -> (Tensor, Tensor)");
  m.def("cpu_group_goodness(Tensor h, int groups, float kappa) -> Tensor");
  m.def("cpu_mm(Tensor a, Tensor b) -> Tensor");
  m.def("cpu_kernels() -> str", &cpu_kernels);
  m.def("cpu_gemm_library() -> str", &ffk::cpu::gemm_library);
}

// `import ff_kernels._C` loads this library (running the registrations above); the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ff_kernels_ext operators (see torch.ops.ff_kernels_ext)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
