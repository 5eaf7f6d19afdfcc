"""The fused CPU path (the extension's CPU operator, what ``backend="auto"`` runs on CPU tensors) beyond the contract
and optimizer-parity tests it shares with the other backends (test_contract.py, test_optim.py, test_low_precision.py,
test_cuda_ext.py): every optimizer and parameter dtype, ``compute_dtype``, the fused finiteness check, the CPU
capability variants, determinism, the operator registrations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from test_contract import assert_outputs_close, make_case

import ff_kernels as ffk
from ff_kernels import backends, functional, optim
from ff_kernels.ops import cuda_step
from ff_kernels.reference_conv import class_goodness_ref

REASON = cuda_step.extension_unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no C++ operator: {REASON}")

FIELDS = ("loss", "goodness_pos", "goodness_neg", "h_pos", "h_neg", "grad_weight", "grad_bias")
# torch.optim's single-tensor implementations are the spec (DESIGN 1.7); the configurations of test_optim.py.
OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.8, weight_decay=0.1, nesterov=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=0.02, betas=(0.3, 0.99))),  # 1 - beta1 >= 0.5: ATen's other lerp formula
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.85, 0.95), weight_decay=0.3)),
]


def config_id(config) -> str:
    name, kw = config
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def data(rows_pos=21, rows_neg=17, k=45, n=23, *, dtype=torch.float32, seed=0):
    """K and N with vector tails in every capability (not multiples of 8, 16 or 32)."""
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(rows_pos, k, generator=gen) + 0.1
    x_neg = torch.rand(rows_neg, k, generator=gen)
    weight = torch.randn(n, k, generator=gen) * 2.0
    bias = 0.3 * torch.randn(n, generator=gen)
    return tuple(t.to(dtype) for t in (x_pos, x_neg, weight, bias))


def test_auto_is_the_fused_operator_on_the_cpu() -> None:
    x_pos, x_neg, weight, bias = data()
    route = functional.route_for("linear_step", "auto", torch.float32, weight)
    assert route.fn is cuda_step.ff_linear_step_cuda and route.finite == functional.FINITE_IN_OP
    mixed = functional.route_for("linear_step", "auto", torch.bfloat16, weight)
    assert mixed.fn is cuda_step.ff_linear_step_cuda, "auto keeps the fused operator for compute_dtype"
    assert backends.resolve_backend("auto", torch.device("cpu")) == "cuda"
    auto = ffk.ff_linear_step(x_pos, x_neg, weight, bias)
    fused = ffk.ff_linear_step(x_pos, x_neg, weight, bias, backend="cuda")
    for name in FIELDS:
        assert torch.equal(getattr(auto, name), getattr(fused, name)), name


def test_deterministic() -> None:
    x_pos, x_neg, weight, bias = data(200, 180, 300, 70)
    first, second = (ffk.ff_linear_step(x_pos, x_neg, weight, bias) for _ in range(2))
    for name in FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@pytest.mark.parametrize("config", OPTIMIZERS, ids=config_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_optimizer_matches_reference_plus_torch_optim(config, bias) -> None:
    """Five fused steps against the reference's gradients fed to torch.optim (foreach=False), in fp32."""
    name, kw = config
    x_pos, x_neg, weight, b = data()
    b = b if bias else None
    params = [weight] if b is None else [weight, b]
    ref_params = [p.clone() for p in params]
    opt = getattr(optim, name)(params, **kw)
    ref_opt = getattr(torch.optim, name)(ref_params, **kw, foreach=False)
    options = dict(threshold=0.5, normalize="l2")
    for step in range(5):
        ref_b = ref_params[1] if bias else None
        expected = ffk.ff_linear_step(x_pos, x_neg, ref_params[0], ref_b, **options, backend="reference")
        out = ffk.ff_linear_step(x_pos, x_neg, weight, b, **options, optimizer=opt)
        assert out.grad_weight is None and out.grad_bias is None
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
        for p, grad in zip(ref_params, (expected.grad_weight, expected.grad_bias)):
            p.grad = grad
        ref_opt.step()
        for p, p_ref in zip(params, ref_params):
            torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=lambda m, step=step: f"step {step}: {m}")
    for state, ref_state in zip(opt.state, (ref_opt.state[p] for p in ref_params)):
        for key, value in ref_state.items():
            if key == "step":
                assert state[key] == int(value)
            else:
                assert state[key].dtype == torch.float32
                torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_low_precision_parameters_update_an_fp32_master(dtype, name) -> None:
    """bf16/fp16 parameters: fp32 state, the update in fp32 rounded once, like optimizer.update on the fused step's
    gradients. Those come back in the parameters' dtype, while the fused update reads them before that rounding:
    the parameters agree to one rounding."""
    x_pos, x_neg, weight, bias = data(dtype=dtype)
    kw = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01, weight_decay=0.1)
    params, ref_params = [weight, bias], [weight.clone(), bias.clone()]
    opt, ref_opt = getattr(optim, name)(params, **kw), getattr(optim, name)(ref_params, **kw)
    for _ in range(3):
        grads = ffk.ff_linear_step(x_pos, x_neg, *ref_params)
        ffk.ff_linear_step(x_pos, x_neg, *params, optimizer=opt)
        ref_opt.update(ref_params, [grads.grad_weight, grads.grad_bias])
        for p, p_ref in zip(params, ref_params):
            assert p.dtype == dtype
            ulp = torch.finfo(dtype).eps
            torch.testing.assert_close(p, p_ref, rtol=ulp, atol=ulp * float(p_ref.abs().max()))
    assert all(t.dtype == torch.float32 for s in opt.state for t in s.values() if isinstance(t, torch.Tensor))


def test_compute_dtype_bf16_with_fp32_parameters() -> None:
    """bf16 GEMMs, fp32 weights: h in bf16, goodness, loss and gradients fp32, each no further from the float64
    truth than twice the torch backend's bf16 compute (FlashAttention's rule, as in test_low_precision.py)."""
    x_pos, x_neg, weight, bias = data(300, 260, 200, 90)
    truth = ffk.ff_linear_step(*(t.double() for t in (x_pos, x_neg, weight, bias)), backend="reference")
    fused = ffk.ff_linear_step(x_pos, x_neg, weight, bias, compute_dtype=torch.bfloat16)
    torch_path = ffk.ff_linear_step(x_pos, x_neg, weight, bias, compute_dtype=torch.bfloat16, backend="torch")
    assert fused.h_pos.dtype == torch.bfloat16 and fused.grad_weight.dtype == torch.float32
    assert fused.loss.dtype == torch.float32 and fused.goodness_pos.dtype == torch.float32
    for name in FIELDS:
        exact = getattr(truth, name)
        err = float((getattr(fused, name).double() - exact).abs().max())
        base = float((getattr(torch_path, name).double() - exact).abs().max())
        assert err <= 2 * base + torch.finfo(torch.bfloat16).eps / 4 * float(exact.abs().max()), (name, err, base)
    h, g = ffk.ff_linear_forward(x_pos, weight, bias, compute_dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and g.dtype == torch.float32
    torch.testing.assert_close(h, fused.h_pos, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_h_is_rounded_once_to_nearest_even(dtype) -> None:
    """h = relu(z + b) rounded once as torch rounds (nearest even), with z the same ATen GEMM's output: bit for bit,
    in whichever variant this CPU runs (AVX512_BF16 narrows with its own instruction)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(67, 45, generator=gen).to(dtype)
    weight, bias = torch.randn(131, 45, generator=gen), torch.randn(131, generator=gen)
    h, _ = ffk.ff_linear_forward(x, weight, bias, normalize="none", compute_dtype=dtype)
    z = torch.mm(x, weight.to(dtype).t())
    expected = torch.relu(z.float() + bias).to(dtype)
    assert torch.equal(h, expected), f"{int((h != expected).sum())} of {h.numel()} elements differ"


def test_compute_dtype_with_adam_keeps_fp32_master_weights() -> None:
    x_pos, x_neg, weight, bias = data()
    ref_w, ref_b = weight.clone(), bias.clone()
    opt, ref_opt = optim.Adam([weight, bias], lr=0.01), optim.Adam([ref_w, ref_b], lr=0.01)
    for _ in range(3):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=opt, compute_dtype=torch.bfloat16)
        ffk.ff_linear_step(x_pos, x_neg, ref_w, ref_b, optimizer=ref_opt, compute_dtype=torch.bfloat16,
                           backend="torch")
    assert weight.dtype == torch.float32
    # Adam normalises the gradient, so a bf16 rounding difference in it moves a weight by at most ~lr per step
    torch.testing.assert_close(weight, ref_w, rtol=0, atol=3 * 0.01)
    assert float((weight - ref_w).abs().mean()) < 1e-3


@pytest.mark.parametrize("name", ["x_pos", "x_neg", "offset_pos", "offset_neg"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_non_finite_input_raises_before_anything_is_written(name, value, optimizer) -> None:
    """The scan is fused into the operator's first pass; the error comes before the parameters, the optimizer
    state or its step count change, so the next good step is the first one."""
    x_pos, x_neg, weight, bias = data()
    args = dict(x_pos=x_pos, x_neg=x_neg, offset_pos=torch.zeros(21), offset_neg=torch.zeros(17))
    bad = args[name].clone()
    bad.view(-1)[7] = value
    kw = dict(lr=0.1, momentum=0.9) if optimizer == "SGD" else dict(lr=0.1)
    opt = getattr(optim, optimizer)([weight, bias], **kw)
    saved = weight.clone(), bias.clone()
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        ffk.ff_linear_step(weight=weight, bias=bias, optimizer=opt, **{**args, name: bad})
    assert torch.equal(weight, saved[0]) and torch.equal(bias, saved[1])
    assert opt.state == [{}, {}]
    fresh_w, fresh_b = saved[0].clone(), saved[1].clone()
    fresh = getattr(optim, optimizer)([fresh_w, fresh_b], **kw)
    ffk.ff_linear_step(weight=weight, bias=bias, optimizer=opt, **args)
    ffk.ff_linear_step(weight=fresh_w, bias=fresh_b, optimizer=fresh, **args)
    assert torch.equal(weight, fresh_w) and torch.equal(bias, fresh_b)


def test_non_finite_input_unchecked_gives_nan() -> None:
    x_pos, x_neg, weight, bias = data()
    x_pos[3, 4] = math.nan
    out = ffk.ff_linear_step(x_pos, x_neg, weight, bias, check_finite=False)
    assert torch.isnan(out.loss) and torch.isnan(out.goodness_pos[3]) and bool(torch.isfinite(out.goodness_neg).all())
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        ffk.ff_linear_forward(x_pos, weight, bias)


def test_large_finite_values_are_not_taken_for_infinities() -> None:
    """x^2 overflows fp32 at |x| > 1.8e19; the scan looks at x itself (x * 0), not at the sum of squares."""
    x_pos, x_neg, weight, bias = data()
    x_pos[0] = 3e30
    out = ffk.ff_linear_step(x_pos, x_neg, weight, bias)
    assert bool(torch.isfinite(out.grad_weight).all())


# csrc/cpu/step_cpu.cpp's kFoldMin: from this many elements of x on, an x in the compute dtype (fp32, fp64) is not
# copied; its row scales are folded into the passes.
FOLD_MIN = 32768


@pytest.mark.parametrize("rows", [21, 200], ids=["copied", "folded"])
def test_adjacent_activations_are_inputs_like_any_other(rows) -> None:
    """h_pos and h_neg are adjacent rows of one tensor, the next layer's inputs (read, never written). A small x is
    copied into an aligned buffer, so the results are bitwise those of copies; a large fp32 x goes to the GEMMs as it
    is, where MKL's kernels may round differently at another alignment."""
    x_pos, x_neg, weight, bias = data(rows, rows - 4, 45, 23 if rows < 100 else 301)
    first = ffk.ff_linear_step(x_pos, x_neg, weight, bias)
    assert ((2 * rows - 4) * first.h_pos.shape[1] >= FOLD_MIN) == (rows >= 100)
    assert first.h_neg.data_ptr() == first.h_pos.data_ptr() + first.h_pos.numel() * first.h_pos.element_size()
    inputs = (first.h_pos.clone(), first.h_neg.clone())
    w2, b2 = data(k=first.h_pos.shape[1], n=11, seed=1)[2:]
    views = ffk.ff_linear_step(first.h_pos, first.h_neg, w2, b2)
    copies = ffk.ff_linear_step(first.h_pos.clone(), first.h_neg.clone(), w2, b2)
    assert torch.equal(first.h_pos, inputs[0]) and torch.equal(first.h_neg, inputs[1])
    for name in FIELDS:
        if rows < 100:
            assert torch.equal(getattr(views, name), getattr(copies, name)), name
        else:
            torch.testing.assert_close(getattr(views, name), getattr(copies, name), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("normalize", ["l2", "rms", "none"])
@pytest.mark.parametrize("loss", ["logistic", "symba"])
@pytest.mark.parametrize("extras", ["bias", "nobias", "offsets"])
def test_folded_row_scales_match_the_reference(dtype, normalize, loss, extras) -> None:
    """An x in the compute dtype above the copy threshold goes to the GEMMs as it is, its row scales folded into GEMM
    1's epilogue and GEMM 2's left operand (P != Q for the logistic loss: the GEMMs take the batches one by one)."""
    rows_neg = 120 if loss == "symba" else 97
    args, kwargs = make_case(120, rows_neg, 300, 70, normalize=normalize, loss=loss, offsets=extras == "offsets",
                             bias=extras != "nobias", dtype=dtype)
    assert 120 * 300 >= FOLD_MIN  # x_pos alone too: the forward below folds as the step does
    expected = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    fused = ffk.ff_linear_step(*args, **kwargs)
    assert_outputs_close(fused, expected, args, kwargs)
    h, g = ffk.ff_linear_forward(args[0], args[2], args[3], normalize=normalize)
    torch.testing.assert_close(h, fused.h_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, fused.goodness_pos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows_pos,rows_neg", [(0, 9), (9, 0)])
def test_one_empty_batch(rows_pos, rows_neg) -> None:
    x_pos, x_neg, weight, bias = data(rows_pos, rows_neg)
    out = ffk.ff_linear_step(x_pos, x_neg, weight, bias)
    ref = ffk.ff_linear_step(x_pos, x_neg, weight, bias, backend="reference")
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-6)


def test_threads_change_rounding_only() -> None:
    """The passes split rows (and grad_b's partial sums) by thread: 1 and 2 threads both meet the contract."""
    args, kwargs = make_case(600, 600, 300, 200)
    threads = torch.get_num_threads()
    reference = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    try:
        torch.set_num_threads(1)
        serial = ffk.ff_linear_step(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert_outputs_close(serial, reference, args, kwargs)
    assert_outputs_close(ffk.ff_linear_step(*args, **kwargs), reference, args, kwargs)


_VARIANT_SCRIPT = """
import json, torch, ff_kernels as ffk
from ff_kernels.ops import cuda_step
gen = torch.Generator().manual_seed(0)
out = {"kernels": cuda_step.cpu_kernels()}
for dtype in (torch.float32, torch.bfloat16):
    x_pos, x_neg = torch.rand(37, 45, generator=gen).to(dtype), torch.rand(29, 45, generator=gen).to(dtype)
    w, b = (torch.randn(23, 45, generator=gen) * 2).to(dtype), (0.3 * torch.randn(23, generator=gen)).to(dtype)
    opt = ffk.optim.Adam([w, b], lr=0.01)
    step = ffk.ff_linear_step(x_pos, x_neg, w, b, optimizer=opt, normalize="rms")
    out[str(dtype)] = [step.loss.item(), step.h_neg.float().sum().item(), w.float().sum().item()]
print(json.dumps(out))
"""


def test_capability_variants_agree() -> None:
    """The passes are compiled per CPU capability and follow ATen's choice (ATEN_CPU_CAPABILITY; left unset, AVX512
    runs the AVX512_BF16 variant on a CPU with AVX512-BF16); every variant this CPU can run gives the same step up
    to rounding."""
    capability = torch.backends.cpu.get_cpu_capability()
    variants = ["default"] + [v for v in ("avx2", "avx512") if v.upper() in ("AVX2", capability)] + [None]
    results = {}
    for variant in variants:
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if variant is not None:
            env["ATEN_CPU_CAPABILITY"] = variant
        proc = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["default"]["kernels"] == "DEFAULT"
    unset = "AVX512_BF16" if capability == "AVX512" and "avx512_bf16" in backends.cpu_flags() else capability
    assert results[None]["kernels"] == unset
    for variant in variants[1:]:
        if variant is not None:
            assert results[variant]["kernels"] == variant.upper()
        for dtype, rtol in (("torch.float32", 1e-5), ("torch.bfloat16", 2e-2)):
            torch.testing.assert_close(torch.tensor(results[variant][dtype]), torch.tensor(results["default"][dtype]),
                                       rtol=rtol, atol=rtol)


def test_opcheck() -> None:
    """Schemas, fake implementations and aliasing of the fused CPU operators (torch.compile's view of them)."""
    ops = torch.ops.ff_kernels_ext
    x_pos, x_neg, w, b = data(5, 5, 7, 3)
    off = torch.randn(5)
    common = (x_pos, x_neg, w, b, off, off, 2.0, 1 / 3, "symba", "l2", 1e-4, 4.0)
    torch.library.opcheck(ops.cpu_step_.default, (*common, torch.bfloat16, True, 0, [], []))
    sgd = [torch.zeros_like(w), torch.zeros_like(b)]
    torch.library.opcheck(ops.cpu_step_.default, (*common, torch.float32, True, 1, sgd,
                                                  [0.1, 0.9, 0.0, 0.01, 1.0, 1.0, 1.0]))
    adam = [torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(b)]
    torch.library.opcheck(ops.cpu_step_.default, (*common, torch.float32, False, 2, adam,
                                                  [1e-2, 0.9, 0.999, 1e-8, 0.01, 1.0, 0.1, 0.0316, 0.1, 0.0316]))
    torch.library.opcheck(ops.cpu_forward.default, (x_pos, w, None, 1 / 3, "rms", 1e-4, torch.bfloat16, True))
    h = torch.rand(3, 12, 5, 4).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.cpu_group_goodness.default, (h, 4, 0.5))
    torch.library.opcheck(ops.cpu_mm.default, (torch.randn(6, 5), torch.randn(5, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m,k,n", [(7, 5, 3), (300, 200, 150), (150, 0, 4)], ids=["small", "onednn-sized", "k0"])
def test_cpu_mm_is_a_matrix_product(dtype, m, k, n) -> None:
    """The step's GEMM (oneDNN for fp32 products of 2^23 multiply-adds and more on non-Intel x86, ATen's mm
    otherwise) against a float64 product, on rows and on a transposed view, as the step calls it."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    expected = a.double() @ b.double().t()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for got in (cuda_step.cpu_mm(a, b.t()), cuda_step.cpu_mm(b, a.t()).t()):
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * max(1.0, k**0.5))


def test_cpu_mm_refuses_bad_operands() -> None:
    with pytest.raises(RuntimeError, match=r"\(M, K\) and \(K, N\)"):
        cuda_step.cpu_mm(torch.randn(3, 4), torch.randn(5, 2))
    with pytest.raises(RuntimeError, match="one dtype"):
        cuda_step.cpu_mm(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64))


_GEMM_SCRIPT = """
import json, torch, ff_kernels as ffk
from ff_kernels.ops import cuda_step
from test_contract import make_case
args, kwargs = make_case(300, 260, 300, 200)
w, b = args[2].clone(), args[3].clone()
opt = ffk.optim.Adam([w, b], lr=0.01)
plain = ffk.ff_linear_step(*args, **kwargs)
ffk.ff_linear_step(args[0], args[1], w, b, **kwargs, optimizer=opt)
print(json.dumps({"library": cuda_step.cpu_gemm_library(), "loss": plain.loss.item(),
                  "grad_weight": plain.grad_weight.tolist(), "h_neg": plain.h_neg.sum().item(), "w": w.tolist()}))
"""


def _run_with_gemm(choice: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FF_KERNELS_CPU_GEMM": choice, "PYTHONPATH": os.path.dirname(__file__)}
    return subprocess.run([sys.executable, "-c", _GEMM_SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_both_gemm_libraries_meet_the_contract() -> None:
    """FF_KERNELS_CPU_GEMM forces either library (the default picks one by CPU vendor, so CI on one kind of CPU would
    test one): both meet the float64 contract at a shape that reaches oneDNN, plain and with the fused Adam, and
    agree with each other to fp32 rounding; an unknown value is refused with its name."""
    args, kwargs = make_case(300, 260, 300, 200)
    reference = ffk.ff_linear_step(*args, **kwargs, backend="reference")
    results = {}
    for choice in ("aten", "onednn"):
        proc = _run_with_gemm(choice)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[choice] = out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["library"] == choice
        assert out["loss"] == pytest.approx(reference.loss.item(), rel=1e-5)
        torch.testing.assert_close(torch.tensor(out["grad_weight"]), reference.grad_weight, rtol=1e-4, atol=1e-6)
    # Adam's first step is about lr * sign(g): 1e-5 is 0.1% of it (where g is near eps, its rounding shows)
    torch.testing.assert_close(torch.tensor(results["aten"]["w"]), torch.tensor(results["onednn"]["w"]),
                               rtol=1e-5, atol=1e-5)
    proc = _run_with_gemm("blas")
    assert proc.returncode != 0 and "FF_KERNELS_CPU_GEMM must be aten, onednn or auto; got 'blas'" in proc.stderr


def test_default_gemm_library_follows_the_cpu_vendor() -> None:
    """oneDNN on x86 CPUs other than Intel's (where ATen's fp32 mm is MKL, off its home ground), ATen elsewhere."""
    if os.environ.get("FF_KERNELS_CPU_GEMM", "auto") not in ("", "auto"):
        pytest.skip("FF_KERNELS_CPU_GEMM is set: the choice is the user's")
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    vendor = backends._cpuinfo("vendor_id")
    if vendor is None:
        pytest.skip("no /proc/cpuinfo to read the CPU vendor from")
    onednn = x86 and vendor not in (None, "GenuineIntel") and torch.backends.mkldnn.is_available() and \
        torch.backends.mkl.is_available()
    assert cuda_step.cpu_gemm_library() == ("onednn" if onednn else "aten")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "shape,groups",
    [((5, 6, 8, 8), 3), ((4, 10, 7, 5), 10), ((3, 130, 3, 5), 10), ((2, 61, 4, 4), 1), ((7, 33), 3), ((0, 6, 4, 4), 2),
     ((3, 0), 1), ((2, 4, 0, 3), 2)],
    ids=["folded", "odd-positions", "wide", "one-group", "rows", "empty", "no-channels", "no-positions"],
)
def test_fused_group_goodness_matches_float64(shape, groups, dtype) -> None:
    """The conv steps' goodness pass (backend='cuda' on CPU tensors): squares formed and summed in fp32 (fp64 for
    fp64) from the widened h, so within fp32 rounding of a float64 sum of the same values, whatever h's dtype; the
    narrow-row path (positions folded into whole vectors) and the wide one alike."""
    gen = torch.Generator().manual_seed(7)
    h = torch.rand(shape, generator=gen).to(dtype)
    if h.dim() == 4:
        h = h.contiguous(memory_format=torch.channels_last)
    out = torch.ops.ff_kernels_ext.cpu_group_goodness(h, groups, 0.25)
    expected = class_goodness_ref(h.double(), groups, 0.25)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == expected.shape
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=0)


def test_fused_group_goodness_refuses_other_layouts() -> None:
    h = torch.rand(2, 6, 4, 4)  # contiguous NCHW, not channels-last
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.ff_kernels_ext.cpu_group_goodness(h, 2, 1.0)
    with pytest.raises(RuntimeError, match="groups must divide"):
        torch.ops.ff_kernels_ext.cpu_group_goodness(h.contiguous(memory_format=torch.channels_last), 4, 1.0)


def test_bf16_compute_without_bf16_instructions_warns_once(monkeypatch) -> None:
    """On a CPU without AVX512-BF16 or AMX, bf16 matrix products are emulated (8x slower than fp32 on an AVX2-only
    EPYC): asking for them warns, once per process."""
    monkeypatch.setattr(backends, "cpu_bf16_matmul", lambda: False)
    monkeypatch.setattr(backends, "_warned_bf16", False)
    monkeypatch.setattr(functional, "_routes", {})
    x_pos, x_neg, weight, bias = data()
    with pytest.warns(UserWarning, match="bfloat16 matrix products on this CPU .* emulated"):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ffk.ff_linear_forward(x_pos.bfloat16(), weight.bfloat16(), bias.bfloat16())
