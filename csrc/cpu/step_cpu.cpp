// CPU implementation of the ff_kernels_ext ops: the closed-form step of ff_kernels/ops/torch_step.py through ATen,
// op for op (same stacking, same operand scaling, same dtypes), and the optimizer updates of ff_kernels/optim.py,
// so that the extension is built and tested on machines without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "../ff_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Goodness, loss and row scales are float32 at least (float64 stays float64, for gradchecks).
at::ScalarType accumulate_type(at::ScalarType t) { return at::promote_types(t, at::kFloat); }

void check_options(c10::string_view loss, c10::string_view normalize) {
  TORCH_CHECK(loss == "logistic" || loss == "symba", "loss must be 'logistic' or 'symba'; got '", loss, "'");
  TORCH_CHECK(normalize == "l2" || normalize == "rms" || normalize == "none",
              "normalize must be 'l2', 'rms' or 'none'; got '", normalize, "'");
}

void check_layer(const Tensor& x, const Tensor& w, const OptTensor& b, const char* name) {
  TORCH_CHECK(w.dim() == 2, "w must be (N, K); got ", w.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), name, " must be (rows, ", w.size(1), "); got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), name, " dtype ", x.scalar_type(), " differs from w's ",
              w.scalar_type());
  TORCH_CHECK(!b || (b->dim() == 1 && b->size(0) == w.size(0) && b->scalar_type() == w.scalar_type()),
              "b must be (", w.size(0), ",) in w's dtype");
}

// r_i of DESIGN 1.1 from the unscaled rows, or nullopt for normalize="none" (r_i = 1: nothing to apply).
OptTensor input_scale(const Tensor& x, c10::string_view normalize, double eps) {
  if (normalize == "none") return std::nullopt;
  Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, false, accumulate_type(x.scalar_type()));
  if (normalize == "rms") norm.mul_(std::pow(static_cast<double>(x.size(1)), -0.5));
  return norm.add_(eps).reciprocal_();
}

// fp16's 5-bit exponent is the only one of our dtypes where c_i r_i h_ij leaves the representable range.
bool narrow_exponent(at::ScalarType t) { return t == at::kHalf; }

// The (P+Q, K) batch as a view of the inputs when it is one, else nullopt. A previous layer's h_pos and h_neg are
// adjacent rows of one tensor: then nothing is copied. An empty batch leaves the other one.
OptTensor stacked_view(const Tensor& x_pos, const Tensor& x_neg) {
  if (x_pos.size(0) == 0 || x_neg.size(0) == 0) return x_pos.size(0) == 0 ? x_neg : x_pos;
  const bool adjacent = x_pos.is_contiguous() && x_neg.is_contiguous() &&
                        x_pos.storage().is_alias_of(x_neg.storage()) &&
                        static_cast<const char*>(x_pos.const_data_ptr()) + x_pos.nbytes() == x_neg.const_data_ptr();
  if (!adjacent) return std::nullopt;
  return x_pos.as_strided({x_pos.size(0) + x_neg.size(0), x_pos.size(1)}, {x_pos.size(1), 1});
}

// The stacked operand of both GEMMs, and the row scale still to apply to GEMM 1's output (nullopt when the operand
// already holds r_i x_i). Usually the operand is a fresh buffer and r_i x_i is written in the stacking copy (formed
// in the accumulate type, rounded once). A view of the caller's tensors cannot be overwritten: wide-exponent dtypes
// keep it and defer r_i, fp16 pays for a scaled copy.
std::tuple<Tensor, OptTensor> stack_scaled_rows(const Tensor& x_pos, const Tensor& x_neg, c10::string_view normalize,
                                                double eps) {
  if (const OptTensor view = stacked_view(x_pos, x_neg)) {
    OptTensor r = input_scale(*view, normalize, eps);
    if (!r || !narrow_exponent(view->scalar_type())) return {*view, r};
    Tensor x = at::empty_like(*view);
    at::mul_out(x, *view, r->unsqueeze(1));
    return {x, std::nullopt};
  }
  Tensor x = at::empty({x_pos.size(0) + x_neg.size(0), x_pos.size(1)}, x_pos.options());
  int64_t row = 0;
  for (const Tensor* part : {&x_pos, &x_neg}) {
    Tensor rows = x.narrow(0, row, part->size(0));
    if (const OptTensor r = input_scale(*part, normalize, eps)) {
      at::mul_out(rows, *part, r->unsqueeze(1));
    } else {
      rows.copy_(*part);
    }
    row += part->size(0);
  }
  return {x, std::nullopt};
}

// GEMM 1 and its epilogue on x and the row scale still to apply to its output (nullopt when x already holds
// r_i x_i, or r_i = 1): h in x's dtype and the goodness g in the accumulate type.
std::tuple<Tensor, Tensor> forward_stacked(const Tensor& x, const Tensor& w, const OptTensor& b, const OptTensor& r,
                                           double kappa) {
  Tensor h;
  if (!r && b) {
    h = at::addmm(*b, x, w.t());
  } else {
    h = at::mm(x, w.t());
    if (r) h.mul_(r->to(h.scalar_type()).unsqueeze(1));
    if (b) h.add_(*b);
  }
  h.relu_();
  Tensor g = at::linalg_vector_norm(h, 2, at::IntArrayRef{1}, false, accumulate_type(h.scalar_type()))
                 .square_()
                 .mul_(kappa);
  return {h, g};
}

// 2^s t in the accumulate type, then `dtype`: the result leaves fp16's range only if the gradient does.
Tensor unscale(const Tensor& t, double scale, at::ScalarType dtype) {
  return t.to(accumulate_type(t.scalar_type())).mul_(scale).to(dtype);
}

// The per-row step (DESIGN 1.5-1.6): the 0-dim loss and c_i = 2 kappa dL/dg_i.
std::tuple<Tensor, Tensor> loss_and_coefficient(const Tensor& g_pos, const Tensor& g_neg, const OptTensor& offset_pos,
                                                const OptTensor& offset_neg, double threshold, double kappa,
                                                c10::string_view loss_kind, double alpha) {
  const Tensor total_pos = offset_pos ? g_pos + *offset_pos : g_pos;
  const Tensor total_neg = offset_neg ? g_neg + *offset_neg : g_neg;
  Tensor loss, c;
  if (loss_kind == "symba") {
    const int64_t rows = g_pos.size(0);
    const Tensor margin = total_pos - total_neg;
    loss = at::softplus(margin * -alpha).mean();
    const Tensor dloss_dmargin = at::sigmoid(margin * -alpha).mul_(-alpha / static_cast<double>(rows));
    c = at::cat({dloss_dmargin, dloss_dmargin.neg()});
  } else {
    const int64_t rows = g_pos.size(0) + g_neg.size(0);
    const Tensor logit_pos = total_pos - threshold;
    const Tensor logit_neg = at::rsub(total_neg, threshold);
    loss = (at::softplus(logit_pos.neg()).sum() + at::softplus(logit_neg.neg()).sum()) / rows;
    c = at::cat({at::sigmoid(logit_pos.neg()).neg_(), at::sigmoid(logit_neg.neg())}).div_(rows);
  }
  return {loss, c.mul_(2.0 * kappa)};
}

using StepResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Forward, goodness, loss and the closed-form gradient (DESIGN 1.6): (loss, g, h, grad_w, grad_b).
StepResult step_impl(const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b,
                     const OptTensor& offset_pos, const OptTensor& offset_neg, double threshold, double kappa,
                     c10::string_view loss_kind, c10::string_view normalize, double eps, double alpha) {
  check_options(loss_kind, normalize);
  check_layer(x_pos, w, b, "x_pos");
  check_layer(x_neg, w, b, "x_neg");
  const int64_t rows_pos = x_pos.size(0);
  TORCH_CHECK(rows_pos + x_neg.size(0) > 0, "x_pos and x_neg are both empty");
  TORCH_CHECK(loss_kind != "symba" || (rows_pos == x_neg.size(0) && rows_pos > 0),
              "loss='symba' pairs rows: x_pos and x_neg need the same, non-zero number of rows");
  auto [x, r] = stack_scaled_rows(x_pos, x_neg, normalize, eps);
  auto [h, g] = forward_stacked(x, w, b, r, kappa);
  auto [loss, c] = loss_and_coefficient(g.narrow(0, 0, rows_pos), g.narrow(0, rows_pos, x_neg.size(0)), offset_pos,
                                        offset_neg, threshold, kappa, loss_kind, alpha);
  // GEMM 2 on (c_i / 2^s) h_i and r_i x_i, unscaled by 2^s in the accumulate type (coefficient_scale, ff_kernels.h).
  const double scale = ffk::coefficient_scale(loss_kind == "symba" ? ffk::Loss::symba : ffk::Loss::logistic,
                                              rows_pos, x_neg.size(0), kappa, alpha);
  const Tensor c_scaled = c.mul(1.0 / scale);
  Tensor grad_w;
  if (!r) {
    grad_w = at::mm((h * c_scaled.to(h.scalar_type()).unsqueeze(1)).t(), x);
  } else {
    // Deferred r (a view, wide exponent): c_i r_i / 2^s goes on the smaller of h (M, N) and x (M, K).
    const Tensor row_coef = (c_scaled * *r).to(h.scalar_type()).unsqueeze(1);
    grad_w = h.size(1) <= x.size(1) ? at::mm((h * row_coef).t(), x) : at::mm(h.t(), x * row_coef);
  }
  Tensor grad_b = b ? unscale(at::mv(h.t(), c_scaled.to(h.scalar_type())), scale, w.scalar_type())
                    : at::empty({0}, w.options());
  return {loss, g, h, unscale(grad_w, scale, w.scalar_type()), grad_b};
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& x, const Tensor& w, const OptTensor& b, double kappa,
                                       c10::string_view normalize, double eps, bool /*allow_tf32*/) {
  check_options("logistic", normalize);
  check_layer(x, w, b, "x");
  auto [xs, r] = stack_scaled_rows(x, x.narrow(0, 0, 0), normalize, eps);
  return forward_stacked(xs, w, b, r, kappa);
}

StepResult step_cpu(const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b,
                    const OptTensor& offset_pos, const OptTensor& offset_neg, double threshold, double kappa,
                    c10::string_view loss, c10::string_view normalize, double eps, double alpha,
                    bool /*allow_tf32*/) {
  return step_impl(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha);
}

// Low-precision parameters are updated through an fp32 master copy and rounded once (ff_kernels.optim).
Tensor master_of(const Tensor& p) {
  return p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble ? p : p.to(at::kFloat);
}

void check_state(const Tensor& state, const Tensor& master, const char* name) {
  TORCH_CHECK(state.sizes() == master.sizes() && state.scalar_type() == master.scalar_type(), name, " must be ",
              master.sizes(), " in ", master.scalar_type(), "; got ", state.sizes(), " in ", state.scalar_type());
}

void sgd_update(const Tensor& p, const Tensor& grad, const OptTensor& buf, bool first, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov) {
  const Tensor master = master_of(p);
  Tensor g = grad.to(master.scalar_type());
  if (weight_decay != 0.0) g = g.add(master, weight_decay);
  if (momentum != 0.0) {
    TORCH_CHECK(buf.has_value(), "SGD with momentum needs its momentum buffers");
    check_state(*buf, master, "momentum buffer");
    if (first) {
      buf->copy_(g);
    } else {
      buf->mul_(momentum).add_(g, 1.0 - dampening);
    }
    g = nesterov ? g.add(*buf, momentum) : *buf;
  }
  master.add_(g, -lr);
  if (!master.is_same(p)) p.copy_(master);
}

void adam_update(const Tensor& p, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool decoupled, double step_size,
                 double bc2_sqrt) {
  const Tensor master = master_of(p);
  check_state(exp_avg, master, "exp_avg");
  check_state(exp_avg_sq, master, "exp_avg_sq");
  Tensor g = grad.to(master.scalar_type());
  if (weight_decay != 0.0) {
    if (decoupled) {
      master.mul_(1.0 - lr * weight_decay);
    } else {
      g = g.add(master, weight_decay);
    }
  }
  exp_avg.lerp_(g, 1.0 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(g, g, 1.0 - beta2);
  const Tensor denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps);
  master.addcdiv_(exp_avg, denom, -step_size);
  if (!master.is_same(p)) p.copy_(master);
}

std::tuple<Tensor, Tensor, Tensor> step_sgd_cpu(const Tensor& x_pos, const Tensor& x_neg, const Tensor& w,
                                                const OptTensor& b, const OptTensor& offset_pos,
                                                const OptTensor& offset_neg, double threshold, double kappa,
                                                c10::string_view loss, c10::string_view normalize, double eps,
                                                double alpha, bool /*allow_tf32*/, const OptTensor& buf_w,
                                                const OptTensor& buf_b, double lr, double momentum, double dampening,
                                                double weight_decay, bool nesterov, bool first_w, bool first_b) {
  auto [out_loss, g, h, grad_w, grad_b] =
      step_impl(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha);
  sgd_update(w, grad_w, buf_w, first_w, lr, momentum, dampening, weight_decay, nesterov);
  if (b) sgd_update(*b, grad_b, buf_b, first_b, lr, momentum, dampening, weight_decay, nesterov);
  return {out_loss, g, h};
}

std::tuple<Tensor, Tensor, Tensor> step_adam_cpu(
    const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, const OptTensor& offset_pos,
    const OptTensor& offset_neg, double threshold, double kappa, c10::string_view loss, c10::string_view normalize,
    double eps, double alpha, bool /*allow_tf32*/, const Tensor& exp_avg_w, const Tensor& exp_avg_sq_w,
    const OptTensor& exp_avg_b, const OptTensor& exp_avg_sq_b, double lr, double beta1, double beta2,
    double adam_eps, double weight_decay, bool decoupled, double step_size_w, double bc2_sqrt_w, double step_size_b,
    double bc2_sqrt_b) {
  auto [out_loss, g, h, grad_w, grad_b] =
      step_impl(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha);
  adam_update(w, grad_w, exp_avg_w, exp_avg_sq_w, lr, beta1, beta2, adam_eps, weight_decay, decoupled, step_size_w,
              bc2_sqrt_w);
  if (b) {
    TORCH_CHECK(exp_avg_b && exp_avg_sq_b, "Adam with a bias needs the bias's exp_avg and exp_avg_sq");
    adam_update(*b, grad_b, *exp_avg_b, *exp_avg_sq_b, lr, beta1, beta2, adam_eps, weight_decay, decoupled,
                step_size_b, bc2_sqrt_b);
  }
  return {out_loss, g, h};
}

}  // namespace

TORCH_LIBRARY_IMPL(ff_kernels_ext, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("step", &step_cpu);
  m.impl("step_sgd_", &step_sgd_cpu);
  m.impl("step_adam_", &step_adam_cpu);
}
