// CUDA implementation of the ff_kernels_ext ops: checks, output and workspace allocation, then one call into the
// kernel launchers (step.cu). Host compiler only and no CUDA headers: the stream comes through the
// device-generic accelerator API, the launchers through the plain interface of ff_kernels.h.
#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../ff_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

ffk::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ffk::DType::f32;
    case at::kHalf: return ffk::DType::f16;
    case at::kBFloat16: return ffk::DType::bf16;
    default: TORCH_CHECK(false, "the CUDA kernels take float32, float16 or bfloat16 tensors; got ", t.scalar_type());
  }
}

ffk::Normalize parse_normalize(c10::string_view s) {
  if (s == "l2") return ffk::Normalize::l2;
  if (s == "rms") return ffk::Normalize::rms;
  TORCH_CHECK(s == "none", "normalize must be 'l2', 'rms' or 'none'; got '", s, "'");
  return ffk::Normalize::none;
}

ffk::Loss parse_loss(c10::string_view s) {
  if (s == "symba") return ffk::Loss::symba;
  TORCH_CHECK(s == "logistic", "loss must be 'logistic' or 'symba'; got '", s, "'");
  return ffk::Loss::logistic;
}

void check_on(const Tensor& t, const Tensor& w, const char* name) {
  TORCH_CHECK(t.device() == w.device(), name, " is on ", t.device(), " but w is on ", w.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_operand(const Tensor& t, const Tensor& w, const char* name) {
  check_on(t, w, name);
  TORCH_CHECK(t.scalar_type() == w.scalar_type(), name, " dtype ", t.scalar_type(), " differs from w's ",
              w.scalar_type());
}

const float* fp32_vector(const OptTensor& t, const Tensor& w, int64_t rows, const char* name) {
  if (!t) return nullptr;
  check_on(*t, w, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows, name, " must be float32 (",
              rows, ",); got ", t->scalar_type(), " ", t->sizes());
  return t->data_ptr<float>();
}

float* fp32_state(const OptTensor& t, const Tensor& param, const Tensor& w, const char* name) {
  TORCH_CHECK(t.has_value(), "the optimizer state ", name, " is missing");
  check_on(*t, w, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == param.sizes(), name, " must be float32 ",
              param.sizes(), "; got ", t->scalar_type(), " ", t->sizes());
  return t->data_ptr<float>();
}

struct Launch {
  ffk::StepArgs args;
  Tensor loss, g, h;
};

// Checks the layer, fills the launcher arguments and allocates h, g and the loss.
Launch prepare(const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, double kappa,
               c10::string_view normalize, double eps, bool allow_tf32, bool step) {
  TORCH_CHECK(w.is_cuda() && w.dim() == 2 && w.is_contiguous(), "w must be a contiguous (N, K) CUDA tensor");
  Launch l;
  ffk::StepArgs& a = l.args;
  a.dtype = dtype_of(w);
  a.allow_tf32 = allow_tf32;
  a.N = w.size(0);
  a.K = w.size(1);
  a.w = w.data_ptr();
  for (const Tensor* x : {&x_pos, &x_neg}) {
    check_operand(*x, w, "x");
    TORCH_CHECK(x->dim() == 2 && x->size(1) == a.K, "x must be (rows, ", a.K, "); got ", x->sizes());
  }
  if (b) {
    check_operand(*b, w, "b");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == a.N, "b must be (", a.N, ",); got ", b->sizes());
    a.b = b->data_ptr();
  }
  a.x_pos = x_pos.data_ptr();
  a.x_neg = x_neg.data_ptr();
  a.P = x_pos.size(0);
  a.Q = step ? x_neg.size(0) : 0;
  a.normalize = parse_normalize(normalize);
  a.eps = static_cast<float>(eps);
  a.kappa = static_cast<float>(kappa);
  a.step = step;
  const int64_t rows = a.P + a.Q;
  l.h = at::empty({rows, a.N}, w.options());
  l.g = at::empty({rows}, w.options().dtype(at::kFloat));
  l.loss = at::empty({}, w.options().dtype(at::kFloat));
  a.h = l.h.data_ptr();
  a.g = l.g.data_ptr<float>();
  a.loss_out = l.loss.data_ptr<float>();
  return l;
}

void set_step_options(ffk::StepArgs& a, const Tensor& w, const OptTensor& offset_pos, const OptTensor& offset_neg,
                      double threshold, c10::string_view loss, double alpha) {
  a.loss = parse_loss(loss);
  TORCH_CHECK(a.P + a.Q > 0, "x_pos and x_neg are both empty");
  TORCH_CHECK(a.loss != ffk::Loss::symba || (a.P == a.Q && a.P > 0),
              "loss='symba' pairs rows: x_pos and x_neg need the same, non-zero number of rows");
  a.threshold = static_cast<float>(threshold);
  a.alpha = static_cast<float>(alpha);
  a.offset_pos = fp32_vector(offset_pos, w, a.P, "offset_pos");
  a.offset_neg = fp32_vector(offset_neg, w, a.Q, "offset_neg");
}

void run(const ffk::StepArgs& a, const Tensor& w) {
  const ffk::Plan plan = ffk::plan_step(a);
  const Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, w.options().dtype(at::kByte));
  void* stream = at::accelerator::getCurrentStream(w.device().index()).native_handle();
  const int err = ffk::launch_step(a, plan, workspace.data_ptr(), stream);
  TORCH_CHECK(err == 0, "ff_kernels_ext CUDA launch failed: ", ffk::error_string(err));
}

std::tuple<Tensor, Tensor> forward_cuda(const Tensor& x, const Tensor& w, const OptTensor& b, double kappa,
                                        c10::string_view normalize, double eps, bool allow_tf32) {
  const c10::DeviceGuard guard(w.device());
  Launch l = prepare(x, x, w, b, kappa, normalize, eps, allow_tf32, /*step=*/false);
  run(l.args, w);
  return {l.h, l.g};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> step_cuda(
    const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, const OptTensor& offset_pos,
    const OptTensor& offset_neg, double threshold, double kappa, c10::string_view loss, c10::string_view normalize,
    double eps, double alpha, bool allow_tf32) {
  const c10::DeviceGuard guard(w.device());
  Launch l = prepare(x_pos, x_neg, w, b, kappa, normalize, eps, allow_tf32, /*step=*/true);
  set_step_options(l.args, w, offset_pos, offset_neg, threshold, loss, alpha);
  Tensor grad_w = at::empty_like(w);
  Tensor grad_b = b ? at::empty_like(*b) : at::empty({0}, w.options());
  l.args.grad_w = grad_w.data_ptr();
  l.args.grad_b = b ? grad_b.data_ptr() : nullptr;
  run(l.args, w);
  return {l.loss, l.g, l.h, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> step_sgd_cuda(
    const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, const OptTensor& offset_pos,
    const OptTensor& offset_neg, double threshold, double kappa, c10::string_view loss, c10::string_view normalize,
    double eps, double alpha, bool allow_tf32, const OptTensor& buf_w, const OptTensor& buf_b, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, bool first_w, bool first_b) {
  const c10::DeviceGuard guard(w.device());
  Launch l = prepare(x_pos, x_neg, w, b, kappa, normalize, eps, allow_tf32, /*step=*/true);
  set_step_options(l.args, w, offset_pos, offset_neg, threshold, loss, alpha);
  ffk::OptArgs& o = l.args.opt;
  o.kind = ffk::Opt::sgd;
  o.lr = static_cast<float>(lr);
  o.momentum = static_cast<float>(momentum);
  o.dampening = static_cast<float>(dampening);
  o.weight_decay = static_cast<float>(weight_decay);
  o.nesterov = nesterov;
  o.first_w = first_w;
  o.first_b = first_b;
  if (momentum != 0.0) {
    o.s1w = fp32_state(buf_w, w, w, "buf_w");
    if (b) o.s1b = fp32_state(buf_b, *b, w, "buf_b");
  }
  run(l.args, w);
  return {l.loss, l.g, l.h};
}

std::tuple<Tensor, Tensor, Tensor> step_adam_cuda(
    const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, const OptTensor& offset_pos,
    const OptTensor& offset_neg, double threshold, double kappa, c10::string_view loss, c10::string_view normalize,
    double eps, double alpha, bool allow_tf32, const Tensor& exp_avg_w, const Tensor& exp_avg_sq_w,
    const OptTensor& exp_avg_b, const OptTensor& exp_avg_sq_b, double lr, double beta1, double beta2,
    double adam_eps, double weight_decay, bool decoupled, double step_size_w, double bc2_sqrt_w, double step_size_b,
    double bc2_sqrt_b) {
  const c10::DeviceGuard guard(w.device());
  Launch l = prepare(x_pos, x_neg, w, b, kappa, normalize, eps, allow_tf32, /*step=*/true);
  set_step_options(l.args, w, offset_pos, offset_neg, threshold, loss, alpha);
  ffk::OptArgs& o = l.args.opt;
  o.kind = ffk::Opt::adam;
  o.lr = static_cast<float>(lr);
  o.beta1 = static_cast<float>(beta1);
  o.beta2 = static_cast<float>(beta2);
  o.eps = static_cast<float>(adam_eps);
  o.weight_decay = static_cast<float>(weight_decay);
  o.decoupled = decoupled;
  o.step_size_w = static_cast<float>(step_size_w);
  o.bc2_sqrt_w = static_cast<float>(bc2_sqrt_w);
  o.step_size_b = static_cast<float>(step_size_b);
  o.bc2_sqrt_b = static_cast<float>(bc2_sqrt_b);
  o.s1w = fp32_state(exp_avg_w, w, w, "exp_avg_w");
  o.s2w = fp32_state(exp_avg_sq_w, w, w, "exp_avg_sq_w");
  if (b) {
    o.s1b = fp32_state(exp_avg_b, *b, w, "exp_avg_b");
    o.s2b = fp32_state(exp_avg_sq_b, *b, w, "exp_avg_sq_b");
  }
  run(l.args, w);
  return {l.loss, l.g, l.h};
}

}  // namespace

TORCH_LIBRARY_IMPL(ff_kernels_ext, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("step", &step_cuda);
  m.impl("step_sgd_", &step_sgd_cuda);
  m.impl("step_adam_", &step_adam_cuda);
}
