// The fused CPU passes of kernels.h, written once with at::vec::Vectorized and compiled once per CPU capability.
// Included by kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp only, after kernels_prelude.h and with
// CPU_CAPABILITY defined: everything here lives in ffk::cpu::CPU_CAPABILITY, as ATen's vector code lives in
// at::vec::CPU_CAPABILITY, so the variants share no symbol.
//
// Numerics: the accumulate type is float (double for double tensors); every reduced-precision value is widened on
// load and rounded once on store. The optimizer formulas are torch.optim's single-tensor ones, in its operation
// order and with ATen's fused lerp, so fp32 parameters follow torch.optim to rounding.
#pragma once

// ATen's vector headers have lambdas whose function-pointer thunks GCC compiles without the target's vector ABI
// under a target pragma (never called here: reduced-precision vectors are widened before any arithmetic).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include "kernels.h"

namespace ffk::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
using acc_t = at::opmath_type<T>;

// Two vectors of the accumulate type: the widening of one reduced-precision vector, and the step of every loop.
template <typename A>
struct Pack {
  Vectorized<A> lo, hi;
  static constexpr int64_t size() { return 2 * Vectorized<A>::size(); }
};

// f(lo...) and f(hi...): one expression for both halves of packs.
template <typename F, typename A, typename... More>
Pack<A> each(const F& f, const Pack<A>& p, const More&... more) {
  return {f(p.lo, more.lo...), f(p.hi, more.hi...)};
}

template <typename A>
Pack<A> splat(A value) {
  return {Vectorized<A>(value), Vectorized<A>(value)};
}

// The first n elements of p (n <= Pack::size()), widened; the rest of the pack is zero (Vectorized::loadu with a
// count zero-fills), which every pass below maps to zeros that are never stored.
template <typename A, typename T>
Pack<A> load(const T* p, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t half = V::size();
  if constexpr (std::is_same_v<T, A>) {
    if (n >= 2 * half) return {V::loadu(p), V::loadu(p + half)};
    return {V::loadu(p, std::min(n, half)), n > half ? V::loadu(p + half, n - half) : V(A(0))};
  } else {
    static_assert(std::is_same_v<A, float>, "reduced-precision values widen to float");
    const auto v = n >= 2 * half ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
    const auto [lo, hi] = at::vec::convert_to_float<T>(v);
    return {lo, hi};
  }
}

// v rounded to T (to nearest even), as one vector of T. The AVX512_BF16 variant narrows to bf16 in one instruction
// (VCVTNE2PS2BF16) where ATen's vectors take about ten integer operations; both round to nearest even, and differ
// only on fp32 denormals (below 1.2e-38), which the instruction reads as zero.
template <typename T, typename A>
Vectorized<T> narrowed(const Pack<A>& v) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return Vectorized<T>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v.hi, v.lo)));
  }
#endif
  return at::vec::convert_from_float<T>(v.lo, v.hi);
}

// Rounds to T once and stores the first n elements.
template <typename T, typename A>
void store(T* p, const Pack<A>& v, int64_t n) {
  constexpr int64_t half = Vectorized<A>::size();
  if constexpr (std::is_same_v<T, A>) {
    if (n >= 2 * half) {
      v.lo.store(p);
      v.hi.store(p + half);
    } else {
      v.lo.store(p, std::min(n, half));
      if (n > half) v.hi.store(p + half, n - half);
    }
  } else {
    const auto r = narrowed<T>(v);
    n >= 2 * half ? r.store(p) : r.store(p, n);
  }
}

// The value a store to T keeps, still in the accumulate type.
template <typename T, typename A>
Pack<A> rounded(const Pack<A>& v) {
  if constexpr (std::is_same_v<T, A>) {
    return v;
  } else {
    const auto [lo, hi] = at::vec::convert_to_float<T>(narrowed<T>(v));
    return {lo, hi};
  }
}

// The sum of a pack's lanes (through memory: per row, not per element).
template <typename A>
A sum(const Pack<A>& p) {
  __at_align__ A lanes[Vectorized<A>::size()];
  (p.lo + p.hi).store(lanes);
  return std::accumulate(lanes, lanes + Vectorized<A>::size(), A(0));
}

// Calls f(T{}) for a floating dtype.
template <typename F>
void with_type(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "the fused CPU step takes float32, float64, bfloat16 or float16 tensors; got ", t);
  }
}

// f(T{}, U{}) when T and U share an accumulate type (float64 does not mix with the others). A named template, not
// an `if constexpr` in the nested generic lambdas below: GCC 12 decides that one before U is known.
template <typename T, typename U, typename F>
void call_compatible(const F& f, at::ScalarType t, at::ScalarType u) {
  if constexpr (std::is_same_v<acc_t<T>, acc_t<U>>) {
    f(T{}, U{});
  } else {
    TORCH_CHECK(false, "the fused CPU step does not mix float64 with other dtypes; got ", t, " and ", u);
  }
}

// Calls f(T{}, U{}) for two dtypes with one accumulate type.
template <typename F>
void with_types(at::ScalarType t, at::ScalarType u, const F& f) {
  with_type(t, [&](auto a) { with_type(u, [&](auto b) { call_compatible<decltype(a), decltype(b)>(f, t, u); }); });
}

// Elements per parallel task, ATen's grain (at::internal::GRAIN_SIZE): below it a pass runs on one thread.
constexpr int64_t kGrain = 32768;

// Rows per task.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)); }

// ---------------------------------------------------------------------------------------------------------------
// Pass 1: r_i and xs_i = r_i x_i (formed in the accumulate type, rounded once), or r_i alone, the finiteness scan in
// the same read. r_i follows ops/torch_step.py's input_scale: 1 / (||x_i|| (* K^-1/2 for rms) + eps).
// ---------------------------------------------------------------------------------------------------------------
template <typename X, typename C>
void scale_rows_impl(ScaleRows& args) {
  using A = acc_t<C>;
  constexpr int64_t step = Pack<A>::size();
  const int64_t rows_pos = args.rows_pos, cols = args.cols;
  const auto* x_pos = static_cast<const X*>(args.x_pos);
  const auto* x_neg = static_cast<const X*>(args.x_neg);
  auto* xs = static_cast<C*>(args.xs);
  auto* scales = static_cast<A*>(args.scales);
  const Normalize normalize = args.normalize;
  const A rms_scale = static_cast<A>(1.0 / std::sqrt(static_cast<double>(cols)));
  const A eps = static_cast<A>(args.eps);
  const bool scan = args.check_finite;
  std::atomic<bool> bad_pos{false}, bad_neg{false};
  if (xs == nullptr && (normalize == Normalize::none || scales == nullptr) && !scan) return;

  at::parallel_for(0, rows_pos + args.rows_neg, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const X* x = i < rows_pos ? x_pos + i * cols : x_neg + (i - rows_pos) * cols;
      Pack<A> squares = splat<A>(0), poison = splat<A>(0);  // poison: x * 0 is NaN exactly where x is not finite
      if (normalize != Normalize::none || scan) {
        for (int64_t j = 0; j < cols; j += step) {
          const Pack<A> v = load<A>(x + j, cols - j);
          squares = each([](auto a, auto acc) { return at::vec::fmadd(a, a, acc); }, v, squares);
          if (scan) poison = each([](auto a, auto acc) { return at::vec::fmadd(a, Vectorized<A>(0), acc); }, v, poison);
        }
      }
      if (scan && std::isnan(sum(poison))) (i < rows_pos ? bad_pos : bad_neg).store(true, std::memory_order_relaxed);
      if (normalize == Normalize::none) {
        if (xs == nullptr) continue;
        C* out = xs + i * cols;
        for (int64_t j = 0; j < cols; j += step) store(out + j, load<A>(x + j, cols - j), cols - j);
        continue;
      }
      A norm = std::sqrt(sum(squares));
      if (normalize == Normalize::rms) norm *= rms_scale;
      const A scale = A(1) / (norm + eps);
      if (xs == nullptr) {
        scales[i] = scale;
        continue;
      }
      C* out = xs + i * cols;
      const Vectorized<A> r(scale);
      for (int64_t j = 0; j < cols; j += step) {
        store(out + j, each([&](auto a) { return a * r; }, load<A>(x + j, cols - j)), cols - j);
      }
    }
  });
  args.nonfinite_pos = bad_pos.load();
  args.nonfinite_neg = bad_neg.load();
}

void scale_rows(ScaleRows& args) {
  with_types(args.x_type, args.xs_type, [&](auto x, auto c) { scale_rows_impl<decltype(x), decltype(c)>(args); });
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 2: GEMM 1's epilogue. Per row: h = relu(r_i z + b) (r_i = 1 unless folded) stored over z, g = kappa * sum h^2
// of the stored (rounded) values; for a step also the loss term and c_i (per row for the logistic loss, per
// (i, P + i) pair for SymBa, whose c couples the two), then a_i = (c_i r_i / 2^s) h_i into GEMM 2's operand and
// (c_i / 2^s) h_i into this thread's partial column sums for grad_b. The loss terms are summed in row order
// afterwards, so the loss does not depend on the threading.
// ---------------------------------------------------------------------------------------------------------------
double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

double sigmoid(double x) {
  const double e = std::exp(-std::abs(x));
  return x >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

template <typename C, typename B>
void finish_rows_impl(const FinishRows& args) {
  using A = acc_t<C>;
  constexpr int64_t step = Pack<A>::size();
  const int64_t rows_pos = args.rows_pos, rows_neg = args.rows_neg, rows = rows_pos + rows_neg, cols = args.cols;
  auto* h = static_cast<C*>(args.h);
  auto* a = static_cast<C*>(args.a);
  const auto* bias = static_cast<const B*>(args.bias);
  const auto* row_scale = static_cast<const A*>(args.row_scale);
  auto* goodness_pos = static_cast<A*>(args.goodness_pos);
  auto* goodness_neg = static_cast<A*>(args.goodness_neg);
  const auto* offset_pos = static_cast<const A*>(args.offset_pos);
  const auto* offset_neg = static_cast<const A*>(args.offset_neg);
  const A kappa = static_cast<A>(args.kappa);
  const bool symba = args.loss == Loss::symba;
  const double threshold = args.threshold, alpha = args.alpha, two_kappa = 2.0 * args.kappa;
  auto* partials = static_cast<A*>(args.bias_partials);
  if (partials != nullptr) std::fill_n(partials, at::get_num_threads() * cols, A(0));

  // h_i = relu(z_i + b) in place; returns g_i.
  const auto activate = [&](int64_t i) {
    C* row = h + i * cols;
    Pack<A> squares = splat<A>(0);
    const Vectorized<A> r(row_scale == nullptr ? A(1) : row_scale[i]);
    for (int64_t j = 0; j < cols; j += step) {
      Pack<A> z = load<A>(row + j, cols - j);
      if (row_scale != nullptr) z = each([&](auto u) { return u * r; }, z);
      if (bias != nullptr) z = each([](auto u, auto v) { return u + v; }, z, load<A>(bias + j, cols - j));
      const Pack<A> out = each([](auto u) { return at::vec::clamp_min(u, Vectorized<A>(0)); }, z);
      store(row + j, out, cols - j);
      squares = each([](auto u, auto acc) { return at::vec::fmadd(u, u, acc); }, rounded<C>(out), squares);
    }
    const A g = kappa * sum(squares);
    (i < rows_pos ? goodness_pos[i] : goodness_neg[i - rows_pos]) = g;
    return g;
  };
  // a_i = coef r_i h_i, and coef h_i into the thread's grad_b partials.
  const auto scale = [&](int64_t i, A coef, A* partial) {
    const C* row = h + i * cols;
    C* out = a + i * cols;
    const Vectorized<A> c(coef), c_a(row_scale == nullptr ? coef : coef * row_scale[i]);
    for (int64_t j = 0; j < cols; j += step) {
      const Pack<A> u = load<A>(row + j, cols - j);
      store(out + j, each([&](auto v) { return v * c_a; }, u), cols - j);
      if (partial != nullptr) {
        store(partial + j, each([&](auto v, auto acc) { return at::vec::fmadd(v, c, acc); }, u,
                                load<A>(partial + j, cols - j)),
              cols - j);
      }
    }
  };

  if (a == nullptr) {
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) activate(i);
    });
    return;
  }
  const double inv_scale = args.inv_scale;
  std::vector<double> terms(symba ? rows_pos : rows);
  const auto total = [&](int64_t i) -> double {
    const A* offset = i < rows_pos ? offset_pos : offset_neg;
    const double g = activate(i);
    return offset == nullptr ? g : g + static_cast<double>(offset[i < rows_pos ? i : i - rows_pos]);
  };
  const int64_t tasks = symba ? rows_pos : rows;
  at::parallel_for(0, tasks, row_grain(symba ? 2 * cols : cols), [&](int64_t begin, int64_t end) {
    A* partial = partials == nullptr ? nullptr : partials + at::get_thread_num() * cols;
    for (int64_t t = begin; t < end; ++t) {
      if (symba) {
        // L = (1/P) sum_i softplus(-alpha m_i), m_i = (g+o)_i - (g+o)_{P+i}; c_i = -c_{P+i} = 2 kappa dL/dm_i.
        const double margin = total(t) - total(rows_pos + t);
        terms[t] = softplus(-alpha * margin);
        const double c = sigmoid(-alpha * margin) * (-alpha / static_cast<double>(rows_pos)) * two_kappa;
        scale(t, static_cast<A>(c * inv_scale), partial);
        scale(rows_pos + t, static_cast<A>(-c * inv_scale), partial);
      } else {
        // u_i = s_i (g_i + o_i - theta); L = (1/M) sum_i softplus(-u_i); c_i = -s_i sigmoid(-u_i) 2 kappa / M.
        const bool positive = t < rows_pos;
        const double logit = positive ? total(t) - threshold : threshold - total(t);
        terms[t] = softplus(-logit);
        const double c = (positive ? -1.0 : 1.0) * sigmoid(-logit) / static_cast<double>(rows) * two_kappa;
        scale(t, static_cast<A>(c * inv_scale), partial);
      }
    }
  });
  double loss = 0.0;
  for (const double term : terms) loss += term;
  *static_cast<A*>(args.loss_out) = static_cast<A>(loss / static_cast<double>(tasks));
  if (partials != nullptr) {
    auto* grad_bias = static_cast<A*>(args.grad_bias);
    const int64_t threads = at::get_num_threads();
    for (int64_t j = 0; j < cols; j += step) {
      Pack<A> acc = splat<A>(0);
      for (int64_t t = 0; t < threads; ++t) {
        acc = each([](auto u, auto v) { return u + v; }, acc, load<A>(partials + t * cols + j, cols - j));
      }
      store(grad_bias + j, acc, cols - j);
    }
  }
}

void finish_rows(const FinishRows& args) {
  const at::ScalarType bias_type = args.bias == nullptr ? args.h_type : args.bias_type;
  with_types(args.h_type, bias_type, [&](auto c, auto b) { finish_rows_impl<decltype(c), decltype(b)>(args); });
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 3: one parameter's update (or its gradient's store), in one read of grad, param and state. The formulas are
// torch.optim's _single_tensor_sgd / _single_tensor_adam (AdamW: decoupled decay), in their operation order and with
// ATen's vector forms (add with alpha and lerp are one fma there, addcmul and addcdiv are not):
//   SGD   g += wd p;  buf = first ? g : momentum buf + (1 - dampening) g;  g = nesterov ? g + momentum buf : buf;
//         p += -lr g
//   Adam  p *= 1 - lr wd (AdamW) or g += wd p (Adam);  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g g;
//         p += -step_size m / (sqrt(v) / bc2_sqrt + eps)
// Low-precision parameters are widened, updated in the accumulate type and rounded once (the fp32 master rule).
// ---------------------------------------------------------------------------------------------------------------
template <typename G, typename W>
void update_impl(const Update& args) {
  using A = acc_t<W>;
  using V = Vectorized<A>;
  constexpr int64_t step = Pack<A>::size();
  const auto* grad = static_cast<const G*>(args.grad);
  auto* param = static_cast<W*>(args.param);
  auto* s1 = static_cast<A*>(args.state1);
  auto* s2 = static_cast<A*>(args.state2);
  const V grad_scale(static_cast<A>(args.grad_scale)), lr(static_cast<A>(-args.lr));
  const V weight_decay(static_cast<A>(args.weight_decay));
  const bool decay = args.weight_decay != 0.0;
  const V momentum(static_cast<A>(args.momentum)), dampened(static_cast<A>(1.0 - args.dampening));
  const V beta2(static_cast<A>(args.beta2)), one_minus_beta2(static_cast<A>(1.0 - args.beta2));
  // ATen's lerp: start + w (end - start) for |w| < 0.5, else end - (1 - w) (end - start), as one fma.
  const double lerp_weight = 1.0 - args.beta1;
  const bool lerp_small = std::abs(lerp_weight) < 0.5;
  const V lerp_coef(static_cast<A>(lerp_small ? lerp_weight : lerp_weight - 1.0));
  const V decoupled_scale(static_cast<A>(1.0 - args.lr * args.weight_decay));
  const V step_size(static_cast<A>(-args.step_size)), bc2_sqrt(static_cast<A>(args.bc2_sqrt));
  const V adam_eps(static_cast<A>(args.eps));
  const Opt kind = args.kind;
  const bool first = args.first, nesterov = args.nesterov, decoupled = args.decoupled;

  at::parallel_for(0, args.numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += step) {
      const int64_t n = std::min(step, end - i);
      Pack<A> g = each([&](auto u) { return u * grad_scale; }, load<A>(grad + i, n));
      if (kind == Opt::none) {
        store(static_cast<W*>(args.grad_out) + i, g, n);
        continue;
      }
      Pack<A> p = load<A>(param + i, n);
      if (kind == Opt::sgd) {
        if (decay) g = each([&](auto u, auto w) { return at::vec::fmadd(w, weight_decay, u); }, g, p);
        if (s1 != nullptr) {
          Pack<A> buf = g;
          if (!first) {
            buf = each([&](auto b, auto u) { return at::vec::fmadd(u, dampened, b * momentum); }, load<A>(s1 + i, n),
                       g);
          }
          store(s1 + i, buf, n);
          g = nesterov ? each([&](auto u, auto b) { return at::vec::fmadd(b, momentum, u); }, g, buf) : buf;
        }
        p = each([&](auto w, auto u) { return at::vec::fmadd(u, lr, w); }, p, g);
      } else {
        if (decay && decoupled) p = each([&](auto w) { return w * decoupled_scale; }, p);
        if (decay && !decoupled) g = each([&](auto u, auto w) { return at::vec::fmadd(w, weight_decay, u); }, g, p);
        const Pack<A> m = each(
            [&](auto start, auto end_) { return at::vec::fmadd(lerp_coef, end_ - start, lerp_small ? start : end_); },
            load<A>(s1 + i, n), g);
        const Pack<A> v = each([&](auto s, auto u) { return s * beta2 + one_minus_beta2 * u * u; },
                               load<A>(s2 + i, n), g);
        store(s1 + i, m, n);
        store(s2 + i, v, n);
        p = each([&](auto w, auto mm, auto vv) { return w + step_size * mm / (vv.sqrt() / bc2_sqrt + adam_eps); },
                 p, m, v);
      }
      store(param + i, p, n);
    }
  });
}

void update(const Update& args) {
  with_types(args.grad_type, args.param_type, [&](auto g, auto w) { update_impl<decltype(g), decltype(w)>(args); });
}

// ---------------------------------------------------------------------------------------------------------------
// The conv steps' goodness: per sample, h^2 summed over the positions into one accumulator per channel, in one read
// of h (widened on load, so no fp32 copy of a bf16 h is written), then over each channel group. A row of fewer than
// 64 channels is read as rows of m positions (m a power of two dividing the positions, m x channels <= 1024): whole
// vectors instead of a short row's tail, the m partial sums of a channel added at the end.
// ---------------------------------------------------------------------------------------------------------------
// The fold's bounds, those of torch_conv.folded_positions (FOLD_BELOW, FOLD_WIDTH): rows of fewer channels than
// one 64-element block, folded up to 1024 elements.
constexpr int64_t kFoldBelow = 64, kFoldWidth = 1024;

template <typename C>
void group_goodness_impl(const GroupGoodness& args) {
  using A = acc_t<C>;
  constexpr int64_t step = Pack<A>::size();
  const int64_t positions = args.positions, channels = args.channels, groups = args.groups;
  int64_t fold = 1;
  while (channels < kFoldBelow && positions % (2 * fold) == 0 && 2 * fold * channels <= kFoldWidth) fold *= 2;
  const int64_t width = fold * channels, lines = positions / fold, group_size = channels / groups;
  const auto* h = static_cast<const C*>(args.h);
  auto* out = static_cast<A*>(args.out);
  const A kappa = static_cast<A>(args.kappa);
  at::parallel_for(0, args.rows, row_grain(positions * channels), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(width);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), A(0));
      const C* sample = h + b * positions * channels;
      for (int64_t line = 0; line < lines; ++line) {
        const C* x = sample + line * width;
        for (int64_t j = 0; j < width; j += step) {
          const Pack<A> v = load<A>(x + j, width - j);
          store(acc.data() + j,
                each([](auto u, auto s) { return at::vec::fmadd(u, u, s); }, v, load<A>(acc.data() + j, width - j)),
                width - j);
        }
      }
      for (int64_t k = 0; k < groups; ++k) {
        A total = 0;
        for (int64_t f = 0; f < fold; ++f) {
          const A* part = acc.data() + f * channels + k * group_size;
          total = std::accumulate(part, part + group_size, total);
        }
        out[b * groups + k] = kappa * total;
      }
    }
  });
}

void group_goodness(const GroupGoodness& args) {
  with_type(args.h_type, [&](auto c) { group_goodness_impl<decltype(c)>(args); });
}

const Kernels table{C10_STRINGIZE(CPU_CAPABILITY), &scale_rows, &finish_rows, &update, &group_goodness};

}  // namespace ffk::cpu::CPU_CAPABILITY
