// CPU implementation of the ff_kernels_ext ops: the fused CPU step. Two GEMMs (gemm.h: ATen's mm, bf16 and fp16
// with fp32 accumulation, or oneDNN's matmul for fp32 on non-Intel x86) and three fused vector passes around them
// (kernels.h): the row scales with the finiteness scan (and the scaled copy of x where x needs a conversion); GEMM 1's epilogue with the goodness, the loss, the
// coefficients, GEMM 2's operand and grad_b; the optimizer update (or the gradients' store). GEMM 2's operands
// follow the rule of ff_kernels.h's coefficient_scale: (c_i / 2^s) h_i and r_i x_i, or (c_i r_i / 2^s) h_i and x_i.
//
// Every CPU op runs the one core below: cpu_step_ and cpu_forward (backend="cuda" on CPU tensors) and forward, step,
// step_sgd_ and step_adam_, the CPU twins of the CUDA kernels (parameters' dtype for the GEMMs, no finiteness check).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/ops/as_strided_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "../ff_kernels.h"
#include "gemm.h"
#include "kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using ffk::Loss;
using ffk::Normalize;
using ffk::Opt;

Normalize parse_normalize(c10::string_view s) {
  if (s == "l2") return Normalize::l2;
  if (s == "rms") return Normalize::rms;
  TORCH_CHECK_VALUE(s == "none", "normalize must be 'l2', 'rms' or 'none'; got '", s, "'");
  return Normalize::none;
}

Loss parse_loss(c10::string_view s) {
  if (s == "symba") return Loss::symba;
  TORCH_CHECK_VALUE(s == "logistic", "loss must be 'logistic' or 'symba'; got '", s, "'");
  return Loss::logistic;
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Goodness, loss, row scales and optimizer state: float32, or float64 for float64 tensors (gradchecks).
at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The optimizer fused into the step; the state tensors are in the accumulate type of the parameter.
struct Optimizer {
  Opt kind = Opt::none;
  OptTensor s1_w, s2_w, s1_b, s2_b;
  double lr = 0.0, weight_decay = 0.0, momentum = 0.0, dampening = 0.0;
  bool nesterov = false, first_w = false, first_b = false;
  double beta1 = 0.0, beta2 = 0.0, eps = 0.0;
  bool decoupled = false;
  double step_size_w = 0.0, bc2_sqrt_w = 1.0, step_size_b = 0.0, bc2_sqrt_b = 1.0;
};

struct Options {
  double threshold = 2.0, kappa = 1.0, eps = 1e-4, alpha = 4.0;
  Loss loss = Loss::logistic;
  Normalize normalize = Normalize::l2;
};

struct Layer {
  Tensor w;
  OptTensor b;
  at::ScalarType compute;
};

// The checks a direct caller of the ops needs (ff_kernels.functional has made them with the public messages).
Layer check_layer(const Tensor& w, const OptTensor& b, std::optional<at::ScalarType> compute_dtype) {
  TORCH_CHECK(w.device().is_cpu(), "the CPU ops take CPU tensors; w is on ", w.device());
  TORCH_CHECK(w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0, "w must be (N, K) with N, K > 0; got ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  TORCH_CHECK(is_float(w.scalar_type()), "w must be float32, float64, bfloat16 or float16; got ", w.scalar_type());
  const at::ScalarType compute = compute_dtype.value_or(w.scalar_type());
  TORCH_CHECK(is_float(compute), "compute_dtype must be float32, float64, bfloat16 or float16; got ", compute);
  TORCH_CHECK(accumulate_type(compute) == accumulate_type(w.scalar_type()),
              "float64 weights need float64 compute (and the reverse); got ", w.scalar_type(), " and ", compute);
  TORCH_CHECK(!b || (b->dim() == 1 && b->size(0) == w.size(0) && b->scalar_type() == w.scalar_type() &&
                     b->is_contiguous() && b->device().is_cpu()),
              "b must be a contiguous (", w.size(0), ",) CPU tensor in w's dtype");
  return {w, b, compute};
}

Tensor check_rows(const Tensor& x, const Layer& layer, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == layer.w.size(1), name, " must be (rows, ", layer.w.size(1), "); got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == layer.w.scalar_type() || x.scalar_type() == layer.compute, name, " dtype ",
              x.scalar_type(), " is neither w's (", layer.w.scalar_type(), ") nor the compute dtype");
  TORCH_CHECK(x.device().is_cpu(), name, " is on ", x.device(), "; the CPU ops take CPU tensors");
  return x.contiguous();
}

template <typename T>
bool all_finite(const T* values, int64_t n) {
  return std::all_of(values, values + n, [](T v) { return std::isfinite(v); });
}

// The offset in the accumulate type (converted if it is not: direct callers), scanned for NaN/inf if asked.
OptTensor check_offset(const OptTensor& offset, int64_t rows, const Layer& layer, bool check_finite,
                       const char* name) {
  if (!offset) return std::nullopt;
  TORCH_CHECK(offset->dim() == 1 && offset->size(0) == rows && offset->device().is_cpu(), name, " must be a (", rows,
              ",) CPU tensor; got ", offset->sizes(), " on ", offset->device());
  const at::ScalarType acc = accumulate_type(layer.compute);
  Tensor out = offset->to(acc).contiguous();
  if (check_finite) {
    const bool finite = acc == at::kDouble ? all_finite(out.const_data_ptr<double>(), rows)
                                           : all_finite(out.const_data_ptr<float>(), rows);
    TORCH_CHECK_VALUE(finite, name, " contains NaN or inf; pass check_finite=False to skip this check");
  }
  return out;
}

void check_state(const OptTensor& state, const Tensor& param, const char* name) {
  TORCH_CHECK(state.has_value(), "the optimizer needs ", name);
  const at::ScalarType acc = accumulate_type(param.scalar_type());
  TORCH_CHECK(state->sizes() == param.sizes() && state->scalar_type() == acc && state->is_contiguous() &&
                  state->device().is_cpu(),
              name, " must be a contiguous ", acc, " CPU tensor shaped like its parameter ", param.sizes(), "; got ",
              state->scalar_type(), " ", state->sizes());
}

// The step's tensors are plain CPU tensors, so allocations, views and GEMMs call ATen's CPU kernels directly
// (at::cpu::, at::detail::empty_cpu): at a small shape the dispatcher's round trips would cost more than the work.
Tensor empty(at::IntArrayRef size, at::ScalarType dtype) { return at::detail::empty_cpu(size, dtype); }

// m^T as a view (Tensor::t() takes three dispatches).
Tensor transposed(const Tensor& m) {
  return at::cpu::as_strided(m, {m.size(1), m.size(0)}, {m.stride(1), m.stride(0)}, m.storage_offset());
}

// A tensor over the P positive and Q negative rows: two allocations, so that no output of cpu_step_ aliases another,
// or two row ranges of one, the CUDA ops' stacked outputs.
struct Rows {
  Tensor pos, neg, stacked;  // stacked is undefined when pos and neg are separate

  Rows(int64_t rows_pos, int64_t rows_neg, at::ScalarType dtype, bool stack) {
    if (stack) {
      stacked = empty({rows_pos + rows_neg}, dtype);
      pos = stacked.narrow(0, 0, rows_pos);
      neg = stacked.narrow(0, rows_pos, rows_neg);
    } else {
      pos = empty({rows_pos}, dtype);
      neg = empty({rows_neg}, dtype);
    }
  }
};

// The GEMMs' right operand over the P + Q rows, as one matrix or as the two batches.
struct Operand {
  Tensor pos, neg;
  Tensor both;    // (P + Q, K), or undefined when the GEMMs take the batches one by one
  Tensor scales;  // (P + Q,) r_i in the accumulate type when they are folded into the passes, else undefined
};

// Below this many elements of x, copying it costs less than the two GEMM calls more that folding takes. (With x hot
// in cache, one GEMM over P + Q rows beats two up to about 1M elements; in `bench`, where other work runs between
// steps, folding wins from P = Q = 512 at K = 784 on: the copy's traffic costs more than the second call.)
constexpr int64_t kFoldMin = 32768;


// Pass 1. Where x is in the compute dtype and that is fp32 or fp64, the GEMMs take x itself and r_i goes into the
// passes (GEMM 1's epilogue and GEMM 2's left operand): x is read once, and not copied. Otherwise (or for a small x)
// into a fresh (P + Q, K) buffer in the compute dtype, r_i x_i, the operand of both GEMMs (GEMM 2's right operand is
// then bounded by 1 in every dtype, and a bf16 or fp16 h is rounded once). Raises on non-finite inputs, naming them
// as the caller does.
Operand scale_rows(const Tensor& x_pos, const Tensor& x_neg, const Layer& layer, Normalize normalize, double eps,
                   bool check_finite, const char* name_pos = "x_pos", const char* name_neg = "x_neg") {
  const int64_t rows_pos = x_pos.size(0), rows_neg = x_neg.size(0);
  TORCH_CHECK(rows_pos == 0 || rows_neg == 0 || x_pos.scalar_type() == x_neg.scalar_type(), "x_pos dtype ",
              x_pos.scalar_type(), " differs from x_neg dtype ", x_neg.scalar_type());
  const at::ScalarType x_type = rows_pos > 0 ? x_pos.scalar_type() : x_neg.scalar_type();
  const bool fold = x_type == layer.compute && accumulate_type(layer.compute) == layer.compute &&
                    (rows_pos + rows_neg) * layer.w.size(1) >= kFoldMin;
  Operand out;
  if (fold) {
    out.pos = x_pos;
    out.neg = x_neg;
    // Two GEMMs each even where x_neg's rows follow x_pos's in memory: the results do not depend on the layout.
    if (rows_neg == 0 || rows_pos == 0) out.both = rows_neg == 0 ? x_pos : x_neg;
    if (normalize != Normalize::none) out.scales = empty({rows_pos + rows_neg}, layer.compute);
  } else {
    out.both = empty({rows_pos + rows_neg, layer.w.size(1)}, layer.compute);
    out.pos = out.both.narrow(0, 0, rows_pos);
    out.neg = out.both.narrow(0, rows_pos, rows_neg);
  }
  ffk::cpu::ScaleRows pass;
  pass.x_pos = x_pos.const_data_ptr();
  pass.x_neg = x_neg.const_data_ptr();
  pass.x_type = x_type;
  pass.rows_pos = rows_pos;
  pass.rows_neg = rows_neg;
  pass.cols = layer.w.size(1);
  pass.xs = fold ? nullptr : out.both.data_ptr();
  pass.xs_type = layer.compute;
  pass.scales = out.scales.defined() ? out.scales.data_ptr() : nullptr;
  pass.normalize = normalize;
  pass.eps = eps;
  pass.check_finite = check_finite;
  {
    RECORD_FUNCTION("ffk::cpu::scale_rows", {});
    ffk::cpu::kernels().scale_rows(pass);
  }
  TORCH_CHECK_VALUE(!pass.nonfinite_pos, name_pos, " contains NaN or inf; pass check_finite=False to skip this check");
  TORCH_CHECK_VALUE(!pass.nonfinite_neg, name_neg, " contains NaN or inf; pass check_finite=False to skip this check");
  return out;
}

// out = x m, or its two row ranges from the two batches.
void mm_rows(Tensor& out, const Operand& x, const Tensor& m) {
  RECORD_FUNCTION("ffk::cpu::gemm1", {});
  if (x.both.defined()) {
    ffk::cpu::gemm(out, x.both, m);
    return;
  }
  const int64_t rows_pos = x.pos.size(0);
  Tensor out_pos = out.narrow(0, 0, rows_pos), out_neg = out.narrow(0, rows_pos, x.neg.size(0));
  ffk::cpu::gemm(out_pos, x.pos, m);
  ffk::cpu::gemm(out_neg, x.neg, m);
}

// out = a^T x, or the sum of the two batches' products (the second accumulated into out by the GEMM, beta = 1).
void mm_transposed_rows(Tensor& out, const Tensor& a, const Operand& x) {
  RECORD_FUNCTION("ffk::cpu::gemm2", {});
  if (x.both.defined()) {
    ffk::cpu::gemm(out, transposed(a), x.both);
    return;
  }
  const int64_t rows_pos = x.pos.size(0);
  ffk::cpu::gemm(out, transposed(a.narrow(0, 0, rows_pos)), x.pos);
  ffk::cpu::gemm(out, transposed(a.narrow(0, rows_pos, x.neg.size(0))), x.neg, /*accumulate=*/true);
}

// GEMM 1 (z = xs W^T in the compute dtype, accumulated in fp32; one call for both batches where xs is one matrix)
// and the pass that finishes it. The bias is added there, in fp32 before h's one rounding, rather than by ATen's
// addmm, which would first copy the broadcast bias over the whole output.
struct Forward {
  Tensor h;
  Rows g;
  ffk::cpu::FinishRows pass;
};

Forward forward_rows(const Operand& xs, const Layer& layer, int64_t rows_pos, int64_t rows_neg, double kappa,
                     bool stack_goodness) {
  const int64_t cols = layer.w.size(0);
  Forward f{empty({rows_pos + rows_neg, cols}, layer.compute),
            Rows(rows_pos, rows_neg, accumulate_type(layer.compute), stack_goodness), {}};
  const Tensor w = layer.w.scalar_type() == layer.compute ? layer.w : layer.w.to(layer.compute);
  mm_rows(f.h, xs, transposed(w));
  ffk::cpu::FinishRows& pass = f.pass;
  pass.h = f.h.data_ptr();
  pass.h_type = layer.compute;
  pass.row_scale = xs.scales.defined() ? xs.scales.const_data_ptr() : nullptr;
  if (layer.b) {
    pass.bias = layer.b->const_data_ptr();
    pass.bias_type = layer.b->scalar_type();
  }
  pass.rows_pos = rows_pos;
  pass.rows_neg = rows_neg;
  pass.cols = cols;
  pass.kappa = kappa;
  pass.goodness_pos = f.g.pos.data_ptr();
  pass.goodness_neg = f.g.neg.data_ptr();
  return f;
}

std::tuple<Tensor, Tensor> forward_impl(const Tensor& x_in, const Layer& layer, double kappa, Normalize normalize,
                                        double eps, bool check_finite) {
  const Tensor x = check_rows(x_in, layer, "x");
  const Operand xs = scale_rows(x, x.narrow(0, 0, 0), layer, normalize, eps, check_finite, "x", "x");
  Forward f = forward_rows(xs, layer, x.size(0), 0, kappa, false);
  {
    RECORD_FUNCTION("ffk::cpu::finish_rows", {});
    ffk::cpu::kernels().finish_rows(f.pass);
  }
  return {f.h, f.g.pos};
}

struct StepResult {
  Tensor loss, h;
  Rows g;
  Tensor grad_w, grad_b;  // undefined when the optimizer consumed them
};

// Applies the update to one parameter from its gradient / 2^s (`grad_type`, at `grad_scaled`), or, without an
// optimizer, returns the gradient in the parameter's dtype (in `grad_buffer`'s memory when its dtype is that).
Tensor update(const Tensor& param, const void* grad_scaled, at::ScalarType grad_type, const Tensor& grad_buffer,
              double scale, const Optimizer& opt, bool is_bias) {
  ffk::cpu::Update pass;
  pass.grad = grad_scaled;
  pass.grad_type = grad_type;
  pass.grad_scale = scale;
  pass.param_type = param.scalar_type();
  pass.numel = param.numel();
  pass.kind = opt.kind;
  Tensor grad;
  if (opt.kind == Opt::none) {
    // In place when the scaled gradient is already in the parameter's dtype: 2^s is exact.
    grad = grad_buffer.defined() && grad_type == param.scalar_type() ? grad_buffer : empty(param.sizes(),
                                                                                            param.scalar_type());
    pass.grad_out = grad.data_ptr();
    RECORD_FUNCTION("ffk::cpu::update", {});
    ffk::cpu::kernels().update(pass);
    return grad;
  }
  const OptTensor& s1 = is_bias ? opt.s1_b : opt.s1_w;
  const OptTensor& s2 = is_bias ? opt.s2_b : opt.s2_w;
  pass.param = param.data_ptr();
  pass.lr = opt.lr;
  pass.weight_decay = opt.weight_decay;
  if (opt.kind == Opt::sgd) {
    pass.momentum = opt.momentum;
    pass.dampening = opt.dampening;
    pass.nesterov = opt.nesterov;
    pass.first = is_bias ? opt.first_b : opt.first_w;
    if (opt.momentum != 0.0) {
      check_state(s1, param, is_bias ? "the bias's momentum buffer" : "the weight's momentum buffer");
      pass.state1 = s1->data_ptr();
    }
  } else {
    check_state(s1, param, is_bias ? "exp_avg_b" : "exp_avg_w");
    check_state(s2, param, is_bias ? "exp_avg_sq_b" : "exp_avg_sq_w");
    pass.state1 = s1->data_ptr();
    pass.state2 = s2->data_ptr();
    pass.beta1 = opt.beta1;
    pass.beta2 = opt.beta2;
    pass.eps = opt.eps;
    pass.decoupled = opt.decoupled;
    pass.step_size = is_bias ? opt.step_size_b : opt.step_size_w;
    pass.bc2_sqrt = is_bias ? opt.bc2_sqrt_b : opt.bc2_sqrt_w;
  }
  RECORD_FUNCTION("ffk::cpu::update", {});
  ffk::cpu::kernels().update(pass);
  return grad;
}

// Forward, goodness, loss, the closed-form gradient (DESIGN 1.6) and the update, if any, of one layer step; the
// goodness as two tensors, or (stack) as row ranges of one.
StepResult step_impl(const Tensor& x_pos_in, const Tensor& x_neg_in, const Layer& layer, const OptTensor& offset_pos,
                     const OptTensor& offset_neg, const Options& o, bool check_finite, const Optimizer& opt,
                     bool stack) {
  const Tensor x_pos = check_rows(x_pos_in, layer, "x_pos");
  const Tensor x_neg = check_rows(x_neg_in, layer, "x_neg");
  const int64_t rows_pos = x_pos.size(0), rows_neg = x_neg.size(0), cols = layer.w.size(0);
  TORCH_CHECK_VALUE(rows_pos + rows_neg > 0, "x_pos and x_neg are both empty: the loss over zero rows is undefined");
  TORCH_CHECK_VALUE(o.loss != Loss::symba || (rows_pos == rows_neg && rows_pos > 0),
                    "loss='symba' pairs rows: x_pos and x_neg need the same, non-zero number of rows");
  const Operand xs = scale_rows(x_pos, x_neg, layer, o.normalize, o.eps, check_finite);
  const OptTensor off_pos = check_offset(offset_pos, rows_pos, layer, check_finite, "offset_pos");
  const OptTensor off_neg = check_offset(offset_neg, rows_neg, layer, check_finite, "offset_neg");

  Forward f = forward_rows(xs, layer, rows_pos, rows_neg, o.kappa, stack);
  const at::ScalarType acc = accumulate_type(layer.compute);
  Tensor loss = empty({}, acc);
  Tensor a = empty({rows_pos + rows_neg, cols}, layer.compute);
  Tensor scratch;
  const double scale = ffk::coefficient_scale(o.loss, rows_pos, rows_neg, o.kappa, o.alpha);
  ffk::cpu::FinishRows& pass = f.pass;
  pass.a = a.data_ptr();
  pass.loss = o.loss;
  pass.threshold = o.threshold;
  pass.alpha = o.alpha;
  pass.inv_scale = 1.0 / scale;
  pass.offset_pos = off_pos ? off_pos->const_data_ptr() : nullptr;
  pass.offset_neg = off_neg ? off_neg->const_data_ptr() : nullptr;
  pass.loss_out = loss.data_ptr();
  if (layer.b) {
    scratch = empty({ffk::cpu::bias_scratch(cols, at::get_num_threads())}, acc);
    pass.grad_bias = scratch.data_ptr();
    pass.bias_partials = static_cast<char*>(scratch.data_ptr()) + cols * scratch.element_size();
  }
  {
    RECORD_FUNCTION("ffk::cpu::finish_rows", {});
    ffk::cpu::kernels().finish_rows(pass);
  }

  // GEMM 2: grad_w / 2^s = a^T xs (a (M, N) and xs (M, K), both in the compute dtype).
  Tensor grad_w_scaled = empty(layer.w.sizes(), layer.compute);
  mm_transposed_rows(grad_w_scaled, a, xs);
  StepResult out{loss, f.h, std::move(f.g), Tensor(), Tensor()};
  out.grad_w = update(layer.w, grad_w_scaled.const_data_ptr(), layer.compute, grad_w_scaled, scale, opt, false);
  if (layer.b) out.grad_b = update(*layer.b, pass.grad_bias, acc, Tensor(), scale, opt, true);
  return out;
}

Options options(double threshold, double kappa, c10::string_view loss, c10::string_view normalize, double eps,
                double alpha) {
  return {threshold, kappa, eps, alpha, parse_loss(loss), parse_normalize(normalize)};
}

// ---------------------------------------------------------------------------------------------------------------
// cpu_step_ and cpu_forward (schemas in ops.cpp)
// ---------------------------------------------------------------------------------------------------------------
Optimizer parse_optimizer(int64_t kind, at::TensorList state, at::ArrayRef<double> hyper, bool has_bias) {
  Optimizer opt;
  const auto state_at = [&](size_t i) -> OptTensor {
    return i < state.size() ? OptTensor(state[i]) : std::nullopt;
  };
  switch (kind) {
    case 0:
      TORCH_CHECK(state.empty() && hyper.empty(), "optimizer 0 (none) takes no state and no hyper-parameters");
      return opt;
    case 1:
      TORCH_CHECK(hyper.size() == 7, "optimizer 1 (SGD) takes 7 hyper-parameters; got ", hyper.size());
      opt.kind = Opt::sgd;
      opt.lr = hyper[0];
      opt.momentum = hyper[1];
      opt.dampening = hyper[2];
      opt.weight_decay = hyper[3];
      opt.nesterov = hyper[4] != 0.0;
      opt.first_w = hyper[5] != 0.0;
      opt.first_b = hyper[6] != 0.0;
      TORCH_CHECK(state.size() == (opt.momentum != 0.0 ? (has_bias ? 2u : 1u) : 0u),
                  "SGD takes one momentum buffer per parameter with momentum, none without; got ", state.size());
      opt.s1_w = state_at(0);
      opt.s1_b = state_at(1);
      return opt;
    case 2:
      TORCH_CHECK(hyper.size() == 10, "optimizer 2 (Adam) takes 10 hyper-parameters; got ", hyper.size());
      TORCH_CHECK(state.size() == (has_bias ? 4u : 2u), "Adam takes exp_avg and exp_avg_sq per parameter; got ",
                  state.size(), " tensors");
      opt.kind = Opt::adam;
      opt.lr = hyper[0];
      opt.beta1 = hyper[1];
      opt.beta2 = hyper[2];
      opt.eps = hyper[3];
      opt.weight_decay = hyper[4];
      opt.decoupled = hyper[5] != 0.0;
      opt.step_size_w = hyper[6];
      opt.bc2_sqrt_w = hyper[7];
      opt.step_size_b = hyper[8];
      opt.bc2_sqrt_b = hyper[9];
      opt.s1_w = state_at(0);
      opt.s2_w = state_at(1);
      opt.s1_b = state_at(2);
      opt.s2_b = state_at(3);
      return opt;
    default:
      TORCH_CHECK(false, "optimizer must be 0 (none), 1 (SGD) or 2 (Adam); got ", kind);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpu_step(
    const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, const OptTensor& offset_pos,
    const OptTensor& offset_neg, double threshold, double kappa, c10::string_view loss, c10::string_view normalize,
    double eps, double alpha, at::ScalarType compute_dtype, bool check_finite, int64_t optimizer,
    at::TensorList state, at::ArrayRef<double> hyper) {
  const Layer layer = check_layer(w, b, compute_dtype);
  const Optimizer opt = parse_optimizer(optimizer, state, hyper, b.has_value());
  StepResult r = step_impl(x_pos, x_neg, layer, offset_pos, offset_neg,
                           options(threshold, kappa, loss, normalize, eps, alpha), check_finite, opt, false);
  const auto or_empty = [&](const Tensor& t) { return t.defined() ? t : empty({0}, w.scalar_type()); };
  return {r.loss, r.g.pos, r.g.neg, r.h, or_empty(r.grad_w), or_empty(r.grad_b)};
}

std::tuple<Tensor, Tensor> cpu_forward(const Tensor& x, const Tensor& w, const OptTensor& b, double kappa,
                                       c10::string_view normalize, double eps, at::ScalarType compute_dtype,
                                       bool check_finite) {
  return forward_impl(x, check_layer(w, b, compute_dtype), kappa, parse_normalize(normalize), eps, check_finite);
}

// The conv steps' goodness (kernels.h's GroupGoodness): h (B, C) rows or (B, C, H, W) channels-last images.
Tensor cpu_group_goodness(const Tensor& h, int64_t groups, double kappa) {
  TORCH_CHECK(h.device().is_cpu(), "h must be a CPU tensor; got ", h.device());
  TORCH_CHECK(is_float(h.scalar_type()), "h must be float32, float64, bfloat16 or float16; got ", h.scalar_type());
  TORCH_CHECK(h.dim() == 2 || h.dim() == 4, "h must be (B, C) or (B, C, H, W); got ", h.sizes());
  const int64_t rows = h.size(0), channels = h.size(1), positions = h.numel() / std::max<int64_t>(rows * channels, 1);
  TORCH_CHECK(groups >= 1 && channels % groups == 0, "groups must divide h's ", channels, " channels; got ", groups);
  TORCH_CHECK(h.dim() == 2 ? h.is_contiguous() : h.is_contiguous(at::MemoryFormat::ChannelsLast),
              "h must be contiguous rows or channels-last images");
  Tensor out = empty({rows, groups}, accumulate_type(h.scalar_type()));
  if (out.numel() == 0) return out;
  if (channels == 0 || positions == 0) return out.zero_();  // sums over nothing
  ffk::cpu::GroupGoodness pass;
  pass.h = h.const_data_ptr();
  pass.h_type = h.scalar_type();
  pass.rows = rows;
  pass.positions = positions;
  pass.channels = channels;
  pass.groups = groups;
  pass.kappa = kappa;
  pass.out = out.data_ptr();
  RECORD_FUNCTION("ffk::cpu::group_goodness", {});
  ffk::cpu::kernels().group_goodness(pass);
  return out;
}

// a b through the step's GEMM (gemm.h): what `bench` times as the fused path's own GEMM floor.
Tensor cpu_mm(const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "cpu_mm takes CPU tensors; got ", a.device(), " and ",
              b.device());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "cpu_mm takes (M, K) and (K, N); got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(is_float(a.scalar_type()) && a.scalar_type() == b.scalar_type(),
              "cpu_mm takes two floating tensors of one dtype; got ", a.scalar_type(), " and ", b.scalar_type());
  Tensor out = empty({a.size(0), b.size(1)}, a.scalar_type());
  if (a.size(1) == 0) return out.zero_();
  RECORD_FUNCTION("ffk::cpu::gemm", {});
  ffk::cpu::gemm(out, a, b);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The CUDA ops' CPU twins: the same core in the parameters' dtype, without the finiteness scan.
// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> forward_cpu(const Tensor& x, const Tensor& w, const OptTensor& b, double kappa,
                                       c10::string_view normalize, double eps, bool /*allow_tf32*/) {
  return forward_impl(x, check_layer(w, b, std::nullopt), kappa, parse_normalize(normalize), eps, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> step_cpu(
    const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, const OptTensor& offset_pos,
    const OptTensor& offset_neg, double threshold, double kappa, c10::string_view loss, c10::string_view normalize,
    double eps, double alpha, bool /*allow_tf32*/) {
  StepResult r = step_impl(x_pos, x_neg, check_layer(w, b, std::nullopt), offset_pos, offset_neg,
                           options(threshold, kappa, loss, normalize, eps, alpha), false, Optimizer{}, true);
  return {r.loss, r.g.stacked, r.h, r.grad_w, r.grad_b.defined() ? r.grad_b : w.new_empty({0})};
}

std::tuple<Tensor, Tensor, Tensor> step_sgd_cpu(const Tensor& x_pos, const Tensor& x_neg, const Tensor& w,
                                                const OptTensor& b, const OptTensor& offset_pos,
                                                const OptTensor& offset_neg, double threshold, double kappa,
                                                c10::string_view loss, c10::string_view normalize, double eps,
                                                double alpha, bool /*allow_tf32*/, const OptTensor& buf_w,
                                                const OptTensor& buf_b, double lr, double momentum, double dampening,
                                                double weight_decay, bool nesterov, bool first_w, bool first_b) {
  Optimizer opt;
  opt.kind = Opt::sgd;
  opt.s1_w = buf_w;
  opt.s1_b = buf_b;
  opt.lr = lr;
  opt.momentum = momentum;
  opt.dampening = dampening;
  opt.weight_decay = weight_decay;
  opt.nesterov = nesterov;
  opt.first_w = first_w;
  opt.first_b = first_b;
  StepResult r = step_impl(x_pos, x_neg, check_layer(w, b, std::nullopt), offset_pos, offset_neg,
                           options(threshold, kappa, loss, normalize, eps, alpha), false, opt, true);
  return {r.loss, r.g.stacked, r.h};
}

std::tuple<Tensor, Tensor, Tensor> step_adam_cpu(
    const Tensor& x_pos, const Tensor& x_neg, const Tensor& w, const OptTensor& b, const OptTensor& offset_pos,
    const OptTensor& offset_neg, double threshold, double kappa, c10::string_view loss, c10::string_view normalize,
    double eps, double alpha, bool /*allow_tf32*/, const Tensor& exp_avg_w, const Tensor& exp_avg_sq_w,
    const OptTensor& exp_avg_b, const OptTensor& exp_avg_sq_b, double lr, double beta1, double beta2,
    double adam_eps, double weight_decay, bool decoupled, double step_size_w, double bc2_sqrt_w, double step_size_b,
    double bc2_sqrt_b) {
  Optimizer opt;
  opt.kind = Opt::adam;
  opt.s1_w = exp_avg_w;
  opt.s2_w = exp_avg_sq_w;
  opt.s1_b = exp_avg_b;
  opt.s2_b = exp_avg_sq_b;
  opt.lr = lr;
  opt.beta1 = beta1;
  opt.beta2 = beta2;
  opt.eps = adam_eps;
  opt.weight_decay = weight_decay;
  opt.decoupled = decoupled;
  opt.step_size_w = step_size_w;
  opt.bc2_sqrt_w = bc2_sqrt_w;
  opt.step_size_b = step_size_b;
  opt.bc2_sqrt_b = bc2_sqrt_b;
  StepResult r = step_impl(x_pos, x_neg, check_layer(w, b, std::nullopt), offset_pos, offset_neg,
                           options(threshold, kappa, loss, normalize, eps, alpha), false, opt, true);
  return {r.loss, r.g.stacked, r.h};
}

}  // namespace

TORCH_LIBRARY_IMPL(ff_kernels_ext, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("step", &step_cpu);
  m.impl("step_sgd_", &step_sgd_cpu);
  m.impl("step_adam_", &step_adam_cpu);
  m.impl("cpu_step_", &cpu_step);
  m.impl("cpu_forward", &cpu_forward);
  m.impl("cpu_group_goodness", &cpu_group_goodness);
  m.impl("cpu_mm", &cpu_mm);
}
