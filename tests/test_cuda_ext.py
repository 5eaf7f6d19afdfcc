"""The C++/CUDA extension (``backend="cuda"``) against the reference (DESIGN 1).

The CPU op is the fused CPU step (csrc/cpu), checked three ways: in float64 against the autograd reference for every
option combination (tight), in float32/bf16/fp16 against the reference beside the torch backend at the same
precision, and with the fused optimizers against ``torch.optim`` over three steps (tests/test_cpu_fused.py has the
rest: every option in fp32, every optimizer, compute_dtype, the finiteness check, the ISA variants). The CUDA tests
need a GPU and an extension built with nvcc, and are skipped with the reason otherwise.
"""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch

from ff_kernels import optim
from ff_kernels._options import check_step_options
from ff_kernels.ops import cuda_step
from ff_kernels.ops.cuda_step import ff_linear_forward_cuda, ff_linear_step_cuda
from ff_kernels.ops.torch_step import ff_linear_step_torch
from ff_kernels.reference import ff_linear_forward_ref, ff_linear_step_ref

REASON = cuda_step.extension_unavailable_reason()
if REASON is not None and shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip(f"no C++ compiler, so no extension: {REASON}", allow_module_level=True)
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"extension unavailable: {REASON}")
CUDA_REASON = cuda_step.extension_unavailable_reason("cuda") if REASON is None else REASON
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA kernels unavailable: {CUDA_REASON}")

FIELDS = ("loss", "goodness_pos", "goodness_neg", "h_pos", "h_neg", "grad_weight", "grad_bias")


def make_inputs(rows_pos, rows_neg, k, n, *, dtype=torch.float32, bias=True, offsets=False, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.rand(rows_pos, k, generator=gen, dtype=torch.float64)
    x_neg = torch.rand(rows_neg, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * (2.0 / k) ** 0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    off_pos = torch.randn(rows_pos, generator=gen) if offsets else None
    off_neg = torch.randn(rows_neg, generator=gen) if offsets else None
    layer = [t if t is None else t.to(device, dtype) for t in (x_pos, x_neg, w, b)]
    return layer + [t if t is None else t.to(device) for t in (off_pos, off_neg)]


def step_options(n, *, goodness="mean", loss="logistic", normalize="l2", threshold=2.0, alpha=4.0):
    return check_step_options(
        threshold=threshold, goodness=goodness, loss=loss, normalize=normalize, eps=1e-4, alpha=alpha, out_features=n
    )


def assert_close(actual, expected, name, rtol):
    """Elementwise rtol with an absolute floor of rtol times the tensor's largest magnitude."""
    assert actual.shape == expected.shape, name
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=rtol * scale + 1e-30, msg=name
    )


def check_outputs(out, ref, rtol):
    for name in FIELDS:
        a, r = getattr(out, name), getattr(ref, name)
        if r is None:
            assert a is None, name
        else:
            assert_close(a, r, name, rtol)


@pytest.mark.skipif(
    os.environ.get("FF_KERNELS_BUILD_EXT") != "1",
    reason="the extension is demanded only when its build was asked for (FF_KERNELS_BUILD_EXT=1, as .ci/run sets); "
    "an isolated `pip install -e .` installs the package without it",
)
def test_extension_is_built():
    """FF_KERNELS_BUILD_EXT=1 (CI) asks for ff_kernels._C: an install that silently went without it fails here."""
    assert REASON is None, REASON


def test_unavailable_reason_names_the_fix():
    reason = cuda_step.extension_unavailable_reason("cuda")
    assert reason is None or "pip install" in reason or "CUDA is not available" in reason
    if REASON is None:
        assert "CPU and CUDA tensors" in cuda_step.extension_unavailable_reason("meta")


# ---------------------------------------------------------------------------------------------------------------
# CPU op
# ---------------------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize(
    "normalize,goodness,loss,offsets,bias",
    list(itertools.product(("l2", "rms", "none"), ("mean", "sum"), ("logistic", "symba"), *[(False, True)] * 2)),
)
def test_cpu_step_every_option(normalize, goodness, loss, offsets, bias):
    rows_neg = 7 if loss == "symba" else 5
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(
        7, rows_neg, 13, 6, dtype=torch.float64, bias=bias, offsets=offsets
    )
    opts = step_options(6, goodness=goodness, loss=loss, normalize=normalize)
    out = ff_linear_step_cuda(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    # 1e-8, not float64's 1e-15: above 20, F.softplus is linear and autograd's slope is 1, where the closed form's
    # sigmoid is 1 - 2e-9.
    check_outputs(out, ff_linear_step_ref(x_pos, x_neg, w, b, opts, off_pos, off_neg), rtol=1e-8)


@needs_ext
@pytest.mark.parametrize("rows_pos,rows_neg", [(0, 9), (9, 0)])
@pytest.mark.parametrize("offsets", [False, True])
def test_cpu_step_empty_batch(rows_pos, rows_neg, offsets):
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(rows_pos, rows_neg, 11, 4, dtype=torch.float64, offsets=offsets)
    opts = step_options(4, normalize="rms")
    out = ff_linear_step_cuda(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    check_outputs(out, ff_linear_step_ref(x_pos, x_neg, w, b, opts, off_pos, off_neg), rtol=1e-8)
    assert out.h_pos.shape == (rows_pos, 4) and out.h_neg.shape == (rows_neg, 4)


LOW = (torch.bfloat16, torch.float16)


def assert_as_close_as_torch(out, want, truth, dtype, fields=FIELDS):
    """The contract tolerance for two paths at one precision against the float64 truth: in fp32 both within rtol
    1e-5 of it (relative to each output's largest value); in bf16/fp16 FlashAttention's rule with the torch backend
    as the baseline (error at most twice the baseline's plus a quarter ulp of the output's largest value)."""
    for name in fields:
        actual, baseline, exact = (getattr(o, name).double() for o in (out, want, truth))
        assert actual.shape == exact.shape and getattr(out, name).dtype == getattr(want, name).dtype, name
        scale = float(exact.abs().max()) if exact.numel() else 0.0
        err = float((actual - exact).abs().max()) if exact.numel() else 0.0
        if dtype in LOW:
            bound = 2 * float((baseline - exact).abs().max()) + torch.finfo(dtype).eps / 4 * scale
        else:
            bound = 1e-5 * scale
        assert err <= bound, (name, err, bound)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize,loss", [("l2", "logistic"), ("rms", "symba"), ("none", "logistic")])
def test_cpu_step_matches_the_torch_backend(dtype, normalize, loss):
    """The CPU op used to run the torch backend's ATen ops in its order, and was compared bitwise. Fused, it sums
    in vector lanes (the sums of squares, grad_b's per-thread partial sums), forms the goodness as kappa sum h^2
    rather than ||h||^2, the loss terms and coefficients in float64, GEMM 2's left operand in fp32 before one
    rounding: it agrees with the torch backend to rounding, not bit for bit. So both are held to the contract
    tolerance against the same float64 truth."""
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(19, 19, 37, 23, dtype=dtype, offsets=True)
    opts = step_options(23, normalize=normalize, loss=loss)
    out = ff_linear_step_cuda(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    want = ff_linear_step_torch(x_pos, x_neg, w, b, opts, off_pos, off_neg, compute_dtype=dtype)
    truth = ff_linear_step_ref(*(t.double() for t in (x_pos, x_neg, w, b)), opts, off_pos.double(), off_neg.double())
    assert_as_close_as_torch(out, want, truth, dtype)


@needs_ext
@pytest.mark.parametrize("normalize", ["l2", "rms", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_forward(normalize, bias):
    x, _, w, b, _, _ = make_inputs(9, 0, 13, 6, dtype=torch.float64, bias=bias)
    h, g = ff_linear_forward_cuda(x, w, b, kappa=1 / 6, normalize=normalize, eps=1e-4)
    h_ref, g_ref = ff_linear_forward_ref(x, w, b, kappa=1 / 6, normalize=normalize, eps=1e-4)
    assert_close(h, h_ref, "h", 1e-12)
    assert_close(g, g_ref, "g", 1e-12)
    x32, w32, b32 = (t if t is None else t.float() for t in (x, w, b))
    h32, g32 = ff_linear_forward_cuda(x32, w32, b32, kappa=1.0, normalize=normalize, eps=1e-4)
    assert h32.dtype == torch.float32 and g32.dtype == torch.float32
    assert_close(h32, h_ref.float(), "h", 1e-5)
    assert_close(g32, (g_ref * 6).float(), "g", 1e-5)


# The fused-update spec is torch.optim's single-tensor step (DESIGN 1.7); ff_kernels.optim's names.
OPTIMIZERS = {
    "sgd": ("SGD", dict(lr=0.1)),
    "sgd_momentum_dampening": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    "sgd_nesterov_wd": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": ("Adam", dict(lr=0.03)),
    "adam_wd": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05)),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
}


def make_optimizer(kind, params, module=optim):
    name, kwargs = OPTIMIZERS[kind]
    if module is torch.optim:
        kwargs = dict(kwargs, foreach=False)  # the single-tensor implementation is the spec
    return getattr(module, name)(params, **kwargs)


@needs_ext
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_fused_update_matches_torch_optim(kind, bias):
    """Three steps with the optimizer inside the op against torch.optim fed the reference gradients."""
    k, n = 13, 6
    _, _, w, b, _, _ = make_inputs(1, 1, k, n, dtype=torch.float64, bias=bias)
    params = [p for p in (w, b) if p is not None]
    params_ref = [p.clone().requires_grad_(True) for p in params]
    opt, opt_ref = make_optimizer(kind, params), make_optimizer(kind, params_ref, torch.optim)
    opts = step_options(n, loss="symba" if kind == "adamw" else "logistic")
    for step in range(3):
        x_pos, x_neg, _, _, off_pos, off_neg = make_inputs(9, 9, k, n, dtype=torch.float64, offsets=step == 1,
                                                           seed=step + 1)
        b_ref = params_ref[1] if bias else None
        ref = ff_linear_step_ref(x_pos, x_neg, params_ref[0], b_ref, opts, off_pos, off_neg)
        out = ff_linear_step_cuda(x_pos, x_neg, w, b, opts, off_pos, off_neg, optimizer=opt)
        assert out.grad_weight is None and out.grad_bias is None
        assert_close(out.loss, ref.loss, f"step {step} loss", 1e-8)
        for p_ref, grad in zip(params_ref, (ref.grad_weight, ref.grad_bias)):
            p_ref.grad = grad
        opt_ref.step()
        for p, p_ref in zip(params, params_ref):
            assert_close(p, p_ref.detach(), f"step {step} param", 1e-8)
    if kind.startswith("adam"):
        assert opt.check_holds("weight", w)["step"] == 3


@needs_ext
def test_cpu_fused_update_bf16_params_keep_fp32_state():
    """bf16 parameters: the update runs on an fp32 master copy with fp32 state, as optimizer.update does; the fused
    gradient agrees with the torch backend's to rounding (test_cpu_step_matches_the_torch_backend), so the updated
    parameters agree to a bf16 rounding and the fp32 state to the gradient's precision."""
    x_pos, x_neg, w, b, _, _ = make_inputs(9, 9, 13, 6, dtype=torch.bfloat16)
    w_ref, b_ref = w.clone(), b.clone()
    opt = optim.SGD([w, b], lr=0.1, momentum=0.9, nesterov=True)
    opt_ref = optim.SGD([w_ref, b_ref], lr=0.1, momentum=0.9, nesterov=True)
    opts = step_options(6)
    for _ in range(2):
        ref = ff_linear_step_torch(x_pos, x_neg, w_ref, b_ref, opts, compute_dtype=torch.bfloat16)
        ff_linear_step_cuda(x_pos, x_neg, w, b, opts, optimizer=opt)
        opt_ref.update([w_ref, b_ref], [ref.grad_weight, ref.grad_bias])
        for p, p_ref in ((w, w_ref), (b, b_ref)):
            assert p.dtype == torch.bfloat16
            torch.testing.assert_close(p, p_ref, rtol=2**-7, atol=2**-7 * float(p_ref.abs().max()))
        buf = opt.check_holds("weight", w)["momentum_buffer"]
        assert buf.dtype == torch.float32
        buf_ref = opt_ref.check_holds("weight", w_ref)["momentum_buffer"]
        torch.testing.assert_close(buf, buf_ref, rtol=2e-2, atol=2e-2 * float(buf_ref.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: schemas, fake implementations, torch.compile
# ---------------------------------------------------------------------------------------------------------------
def _opcheck_inputs(device="cpu", bias=True, dtype=torch.float32):
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(5, 5, 7, 3, bias=bias, offsets=True, device=device, dtype=dtype)
    return x_pos, x_neg, w, b, off_pos, off_neg, 2.0, 1.0 / 3, "symba", "l2", 1e-4, 4.0, False


def _opcheck_all(device):
    ops = torch.ops.ff_kernels_ext
    x, _, w, b, _, _ = make_inputs(5, 0, 7, 3, device=device)
    torch.library.opcheck(ops.forward.default, (x, w, b, 1.0 / 3, "rms", 1e-4, False))
    torch.library.opcheck(ops.step.default, _opcheck_inputs(device))
    torch.library.opcheck(ops.step.default, _opcheck_inputs(device, bias=False))
    args = _opcheck_inputs(device)
    bufs = (torch.zeros_like(args[2]), torch.zeros_like(args[3]))
    torch.library.opcheck(ops.step_sgd_.default, (*args, *bufs, 0.1, 0.9, 0.0, 0.01, True, True, True))
    args = _opcheck_inputs(device, bias=False)
    state = (torch.zeros_like(args[2]), torch.zeros_like(args[2]), None, None)
    torch.library.opcheck(
        ops.step_adam_.default, (*args, *state, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, 0.1, 0.0316, 0.1, 0.0316)
    )


@needs_ext
def test_opcheck_cpu():
    _opcheck_all("cpu")


@needs_ext
def test_torch_compile_fullgraph():
    """The ops are opaque to torch.compile: a step with a fused optimizer traces without graph breaks."""
    torch._dynamo.reset()
    x_pos, x_neg, w, b, _, _ = make_inputs(9, 9, 11, 5)
    w_next = make_inputs(1, 1, 5, 7)[2]
    opts = step_options(5)
    w_eager, b_eager = w.clone(), b.clone()
    opt, opt_eager = optim.Adam([w, b], lr=0.1), optim.Adam([w_eager, b_eager], lr=0.1)

    def step(x_pos, x_neg, w, b, optimizer):
        out = ff_linear_step_cuda(x_pos, x_neg, w, b, opts, optimizer=optimizer)
        h, g = ff_linear_forward_cuda(out.h_pos, w_next, None, kappa=1.0, normalize="rms", eps=1e-4)
        return out.loss, out.goodness_neg, h, g

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        got, want = compiled(x_pos, x_neg, w, b, opt), step(x_pos, x_neg, w_eager, b_eager, opt_eager)
        for a, e in zip(got, want):
            assert torch.equal(a, e)
        assert torch.equal(w, w_eager) and torch.equal(b, b_eager)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# CUDA launch plan (host code in csrc/cuda/plan.h, reached through the CPU extension: no GPU needed)
# ---------------------------------------------------------------------------------------------------------------
H100_SMS = 132
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DESIGN_LAYERS = [(784, 500), (500, 500), (2000, 2000), (4096, 4096)]  # DESIGN 4's (K, N)


def plan_grad(rows, k, n, sms=H100_SMS, dtype=torch.bfloat16, resident=1):
    cfg, tile_n, tile_k, tiles, split, programs, workspace = torch.ops.ff_kernels_ext.plan_grad(
        rows, n, k, sms, DTYPE_CODES[dtype], resident
    )
    return dict(cfg=cfg, tile_n=tile_n, tile_k=tile_k, tiles=tiles, split=split, programs=programs,
                workspace=workspace)


def split_workspace_bytes(plan, k, n):
    """fp32 partial tiles [split][tiles][tile_n * tile_k], bias partials [split][N tiles][tile_n], a ticket a tile."""
    if plan["split"] == 1:
        return 0
    n_tiles, tile = -(-n // plan["tile_n"]), plan["tile_n"] * plan["tile_k"]
    return 4 * plan["split"] * (plan["tiles"] * tile + n_tiles * plan["tile_n"]) + 4 * plan["tiles"]


@needs_ext
@pytest.mark.parametrize("resident", [1, 3])
@pytest.mark.parametrize("sms", [H100_SMS, 108])
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("rows_each", [4096, 25000])
@pytest.mark.parametrize("k,n", DESIGN_LAYERS)
def test_grad_plan_fills_a_wave(k, n, rows_each, dtype, sms, resident):
    """DESIGN 10: GEMM 2 has at least one full wave at every DESIGN 4 shape with P = Q >= 4096, a wave being every
    SM holding as many 64 x 64 blocks as the device reports it can (`resident`; 128 x 128 tiles count SMs)."""
    plan = plan_grad(2 * rows_each, k, n, sms, dtype, resident)
    wave = sms * (resident if plan["cfg"] == 1 else 1)
    assert plan["tiles"] == -(-n // plan["tile_n"]) * -(-k // plan["tile_k"])
    assert plan["programs"] == plan["tiles"] * plan["split"] >= wave, plan
    if plan["split"] > 1:
        assert plan["tiles"] < wave and plan["programs"] <= 2 * wave, plan
    assert plan["workspace"] == split_workspace_bytes(plan, k, n)


@needs_ext
def test_grad_plan_at_the_design_shapes():
    """The H100 plans the closing notes quote: 64 x 64 tiles split 2 and 4 ways for the 500-wide layers."""
    rows = 2 * 4096
    assert plan_grad(rows, 784, 500) == dict(cfg=1, tile_n=64, tile_k=64, tiles=104, split=2, programs=208,
                                             workspace=2 * 104 * 64 * 64 * 4 + 2 * 8 * 64 * 4 + 104 * 4)
    assert plan_grad(rows, 500, 500)["split"] == 4 and plan_grad(rows, 500, 500)["programs"] == 256
    for k, n in [(2000, 2000), (4096, 4096)]:
        plan = plan_grad(rows, k, n)
        assert plan["cfg"] == 0 and plan["split"] == 1 and plan["workspace"] == 0, plan
    assert plan_grad(rows, 2000, 2000)["programs"] == 256
    # Two 64 x 64 blocks per SM: a wave is 264 blocks, so 104 tiles split 5 ways (520 programs, under two waves).
    assert plan_grad(rows, 784, 500, resident=2)["split"] == 5


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_grad_plan_split_limits(dtype):
    chunk = 64 // torch.tensor([], dtype=dtype).element_size()  # rows per pipeline stage
    # No split once the tiles fill a wave, whatever the batch.
    for k, n in [(2000, 2000), (1024, 8192), (8448, 128)]:
        assert plan_grad(10**6, k, n, dtype=dtype)["split"] == 1
    # At least 8 row chunks per split: a small batch splits less or not at all.
    assert plan_grad(8 * chunk - 1, 784, 500, dtype=dtype)["split"] == 1
    assert plan_grad(2 * 8 * chunk, 500, 500, dtype=dtype)["split"] == 2
    assert plan_grad(1024, 784, 500, dtype=dtype)["split"] == min(2, 1024 // chunk // 8)
    # At most 16 partial tiles per reduction.
    tiny = plan_grad(10**6, 13, 6, dtype=dtype)
    assert tiny["tiles"] == 1 and tiny["split"] == 16
    assert plan_grad(0, 13, 6, dtype=dtype)["split"] == 1 and plan_grad(100, 0, 6, dtype=dtype)["programs"] == 0


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_grad_plan_small_batches_are_reported(dtype):
    """P = Q = 512 is launch-bound (DESIGN 10: reported, no gate); the plan still never exceeds two waves."""
    for k, n in DESIGN_LAYERS:
        plan = plan_grad(1024, k, n, dtype=dtype)
        assert plan["programs"] <= max(plan["tiles"], 2 * H100_SMS), plan
        assert plan["workspace"] == split_workspace_bytes(plan, k, n)


@needs_ext
def test_grad_plan_checks_its_arguments():
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ff_kernels_ext.plan_grad(10, 10, 10, 132, 3)
    with pytest.raises(RuntimeError, match="sms"):
        torch.ops.ff_kernels_ext.plan_grad(10, 10, 10, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels (GPU only)
# ---------------------------------------------------------------------------------------------------------------
# P, Q, K, N: tails in every tile dimension, both tile configurations, every copy width of GEMM 1 (bf16: K = 784 ->
# 16 bytes, 500 -> 8, 250 -> 4, 45 -> realigned 16-byte spans), GEMM 2 split over the rows (K = 784, N = 500 on
# fewer than 208 SMs), multi-block row kernels and empty batches.
CUDA_SHAPES = [(37, 29, 45, 23), (0, 41, 250, 70), (300, 0, 500, 130), (700, 700, 784, 500), (1, 1, 1, 1)]
LOW_PRECISION_RTOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _cuda_case(dtype, shape, normalize, goodness, loss, bias, offsets, tf32=False):
    rows_pos, rows_neg, k, n = shape
    if loss == "symba":
        rows_pos = rows_neg = max(rows_pos, rows_neg)
    x_pos, x_neg, w, b, off_pos, off_neg = make_inputs(
        rows_pos, rows_neg, k, n, dtype=dtype, bias=bias, offsets=offsets, device="cuda"
    )
    opts = step_options(n, goodness=goodness, loss=loss, normalize=normalize)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        out = ff_linear_step_cuda(x_pos, x_neg, w, b, opts, off_pos, off_neg)
    finally:
        matmul.fp32_precision = saved
    exact = ff_linear_step_ref(x_pos.double(), x_neg.double(), w.double(), None if b is None else b.double(), opts,
                               off_pos, off_neg)
    return out, exact


@needs_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize(
    "normalize,goodness,loss,bias,offsets",
    [("l2", "mean", "logistic", True, False), ("rms", "sum", "symba", False, True), ("none", "mean", "logistic",
                                                                                     True, True)],
)
def test_cuda_step_fp32_exact(shape, normalize, goodness, loss, bias, offsets):
    out, exact = _cuda_case(torch.float32, shape, normalize, goodness, loss, bias, offsets)
    for name in FIELDS:
        a, r = getattr(out, name), getattr(exact, name)
        if r is None:
            assert a is None
        else:
            assert_close(a.double(), r, name, 1e-4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "tf32"])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_step_tensor_cores(dtype, shape):
    tf32 = dtype == "tf32"
    dtype = torch.float32 if tf32 else dtype
    out, exact = _cuda_case(dtype, shape, "l2", "mean", "logistic", True, True, tf32=tf32)
    rtol = 3e-3 if tf32 else LOW_PRECISION_RTOL[dtype]
    for name in FIELDS:
        assert_close(getattr(out, name).double(), getattr(exact, name), name, rtol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward(dtype):
    x, _, w, b, _, _ = make_inputs(333, 0, 500, 130, dtype=dtype, device="cuda")
    h, g = ff_linear_forward_cuda(x, w, b, kappa=1 / 130, normalize="l2", eps=1e-4)
    h_ref, g_ref = ff_linear_forward_ref(x.double(), w.double(), b.double(), kappa=1 / 130, normalize="l2", eps=1e-4)
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    assert h.dtype == dtype and g.dtype == torch.float32
    assert_close(h.double(), h_ref, "h", rtol)
    assert_close(g.double(), g_ref, "g", rtol)


def _device_sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


@needs_cuda
@pytest.mark.parametrize("kind", [None, *OPTIMIZERS])
@pytest.mark.parametrize("rows_pos,rows_neg,k,n", [(1001, 998, 250, 70), (333, 1200, 45, 23), (2047, 2047, 500, 130)])
def test_cuda_split_grad(kind, rows_pos, rows_neg, k, n):
    """GEMM 2 split over the rows (odd M, several split counts): the reference's numbers, bit-identical twice."""
    plan = plan_grad(rows_pos + rows_neg, k, n, _device_sms(), torch.float32)
    assert plan["split"] > 1, plan
    x_pos, x_neg, w0, b0, _, _ = make_inputs(rows_pos, rows_neg, k, n, device="cuda", seed=7)
    opts = step_options(n)
    runs = []
    for _ in range(2):
        w, b = w0.clone(), b0.clone()
        optimizer = None if kind is None else make_optimizer(kind, [w, b])
        out = ff_linear_step_cuda(x_pos, x_neg, w, b, opts, optimizer=optimizer)
        runs.append((out, w, b))
    ref = ff_linear_step_ref(x_pos, x_neg, w0, b0, opts)
    (first, w1, b1), (second, w2, b2) = runs
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    if kind is None:
        for name in ("grad_weight", "grad_bias"):
            assert torch.equal(getattr(first, name), getattr(second, name)), name
            assert_close(getattr(first, name), getattr(ref, name), name, 1e-4)
    else:
        w_ref, b_ref = w0.clone(), b0.clone()
        make_optimizer(kind, [w_ref, b_ref]).update([w_ref, b_ref], [ref.grad_weight, ref.grad_bias])
        assert_close(w1, w_ref, "weight", 1e-4)
        assert_close(b1, b_ref, "bias", 1e-4)


@needs_cuda
def test_cuda_step_is_deterministic():
    x_pos, x_neg, w, b, _, _ = make_inputs(1000, 1000, 784, 500, device="cuda")
    opts = step_options(500)
    first, second = (ff_linear_step_cuda(x_pos, x_neg, w, b, opts) for _ in range(2))
    for name in FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@needs_cuda
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_cuda_fused_update_matches_optimizer(kind):
    """Three steps with the update fused into the GEMM 2 epilogue against optimizer.update on reference grads."""
    k, n = 250, 70
    _, _, w, b, _, _ = make_inputs(1, 1, k, n, device="cuda")
    w_ref, b_ref = w.clone(), b.clone()
    opt, opt_ref = make_optimizer(kind, [w, b]), make_optimizer(kind, [w_ref, b_ref])
    opts = step_options(n)
    for step in range(3):
        x_pos, x_neg, _, _, _, _ = make_inputs(300, 200, k, n, seed=step + 1, device="cuda")
        ref = ff_linear_step_ref(x_pos, x_neg, w_ref, b_ref, opts)
        ff_linear_step_cuda(x_pos, x_neg, w, b, opts, optimizer=opt)
        opt_ref.update([w_ref, b_ref], [ref.grad_weight, ref.grad_bias])
        for p, p_ref, label in ((w, w_ref, "weight"), (b, b_ref, "bias")):
            assert_close(p, p_ref, f"step {step} {label}", 1e-4)
            state, state_ref = opt.check_holds(label, p), opt_ref.check_holds(label, p_ref)
            for key, value in state_ref.items():
                if isinstance(value, torch.Tensor):
                    assert state[key].dtype == torch.float32
                    assert_close(state[key], value, f"step {step} {label} {key}", 1e-4)
                else:
                    assert state[key] == value


@needs_cuda
def test_cuda_fp16_row_coefficients_do_not_underflow():
    x_pos, x_neg, w, b, _, _ = make_inputs(4096, 4096, 45, 23, dtype=torch.float16, device="cuda")
    opts = step_options(23)
    out = ff_linear_step_cuda(x_pos * 100, x_neg * 100, w, b, opts)
    exact = ff_linear_step_ref(x_pos * 100, x_neg * 100, w, b, opts)
    scale = exact.grad_weight.float().abs().max().item()
    assert (out.grad_weight.float() - exact.grad_weight.float()).abs().max().item() <= 5e-3 * scale


@needs_cuda
def test_opcheck_cuda():
    _opcheck_all("cuda")
