"""Bad inputs at the public boundary: every one raises, and the message names the argument."""

from __future__ import annotations

import math

import pytest
import torch

import ff_kernels as ffk
from ff_kernels import backends, dispatch, optim
from ff_kernels.ops import torch_step

P, Q, K, N = 6, 5, 7, 4


def data(dtype=torch.float32, rows_pos=P, rows_neg=Q, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_pos = torch.randn(rows_pos, K, generator=gen).to(dtype)
    x_neg = torch.randn(rows_neg, K, generator=gen).to(dtype)
    weight = torch.randn(N, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    return x_pos, x_neg, weight, bias


def step(**overrides):
    x_pos, x_neg, weight, bias = data()
    kwargs = dict(x_pos=x_pos, x_neg=x_neg, weight=weight, bias=bias)
    kwargs.update(overrides)
    return ffk.ff_linear_step(
        kwargs.pop("x_pos"), kwargs.pop("x_neg"), kwargs.pop("weight"), kwargs.pop("bias"), **kwargs
    )


def forward(**overrides):
    x_pos, _, weight, bias = data()
    kwargs = dict(x=x_pos, weight=weight, bias=bias)
    kwargs.update(overrides)
    return ffk.ff_linear_forward(kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("bias"), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# shapes


def test_feature_mismatch() -> None:
    with pytest.raises(ValueError, match="x_pos has 6 features but weight expects in_features=7"):
        step(x_pos=torch.randn(P, 6))
    with pytest.raises(ValueError, match="x_neg has 8 features but weight expects in_features=7"):
        step(x_neg=torch.randn(Q, 8))


@pytest.mark.parametrize("shape", [(K,), (2, P, K)], ids=["1d", "3d"])
@pytest.mark.parametrize("name", ["x_pos", "x_neg"])
def test_input_rank(name, shape) -> None:
    with pytest.raises(ValueError, match=f"{name} must have shape \\(batch, in_features\\)"):
        step(**{name: torch.randn(*shape)})


@pytest.mark.parametrize("shape", [(N * K,), (1, N, K)], ids=["1d", "3d"])
def test_weight_rank(shape) -> None:
    with pytest.raises(ValueError, match="weight must have shape \\(out_features, in_features\\)"):
        step(weight=torch.randn(*shape))


def test_weight_empty() -> None:
    with pytest.raises(ValueError, match="weight must have at least one row"):
        step(weight=torch.randn(0, K), bias=None)


@pytest.mark.parametrize("shape", [(N + 1,), (1, N), ()])
def test_bias_shape(shape) -> None:
    with pytest.raises(ValueError, match=f"bias must have shape \\({N},\\)"):
        step(bias=torch.randn(shape))


def test_symba_needs_equal_rows() -> None:
    with pytest.raises(ValueError, match="loss='symba' pairs rows: x_pos has 6 rows but x_neg has 5"):
        step(loss="symba")


def test_symba_empty() -> None:
    with pytest.raises(ValueError, match="loss='symba' needs at least one pair"):
        step(x_pos=torch.randn(0, K), x_neg=torch.randn(0, K), loss="symba")


def test_both_batches_empty() -> None:
    with pytest.raises(ValueError, match="x_pos and x_neg are both empty"):
        step(x_pos=torch.randn(0, K), x_neg=torch.randn(0, K))


# ---------------------------------------------------------------------------------------------------------------
# offsets


@pytest.mark.parametrize("name,rows", [("offset_pos", P), ("offset_neg", Q)])
def test_offset_length(name, rows) -> None:
    with pytest.raises(ValueError, match=f"{name} must have shape \\({rows},\\), one value per row"):
        step(**{name: torch.zeros(rows + 1)})
    with pytest.raises(ValueError, match=f"{name} must have shape"):
        step(**{name: torch.zeros(rows, 1)})


@pytest.mark.parametrize("name,rows", [("offset_pos", P), ("offset_neg", Q)])
def test_offset_integer_dtype(name, rows) -> None:
    with pytest.raises(TypeError, match=f"{name} must be a floating tensor"):
        step(**{name: torch.zeros(rows, dtype=torch.int64)})
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
        step(**{name: [0.0] * rows})


@pytest.mark.parametrize("name,rows", [("offset_pos", P), ("offset_neg", Q)])
def test_offset_wrong_device(name, rows) -> None:
    # the meta device stands in for a second device on machines that have only a CPU
    with pytest.raises(ValueError, match=f"{name} is on meta but the inputs are on cpu"):
        step(**{name: torch.zeros(rows, device="meta")})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_offset_on_cuda_inputs_on_cpu() -> None:
    with pytest.raises(ValueError, match="offset_pos is on cuda"):
        step(offset_pos=torch.zeros(P, device="cuda"))


def test_low_precision_offsets_are_accepted_as_float32() -> None:
    off = torch.linspace(-1, 1, P)
    a = step(offset_pos=off, backend="reference")
    b = step(offset_pos=off.double(), backend="reference")
    assert torch.equal(a.loss, b.loss)


# ---------------------------------------------------------------------------------------------------------------
# dtypes and devices


@pytest.mark.parametrize("name", ["x_pos", "x_neg"])
def test_integer_inputs(name) -> None:
    with pytest.raises(TypeError, match=f"{name} must be a floating tensor"):
        step(**{name: torch.ones(P if name == "x_pos" else Q, K, dtype=torch.int32)})
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
        step(**{name: [[1.0] * K]})


def test_integer_weight_and_bias() -> None:
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        step(weight=torch.ones(N, K, dtype=torch.int64))
    with pytest.raises(TypeError, match="bias must be a floating tensor"):
        step(bias=torch.ones(N, dtype=torch.int64))


def test_mixed_dtypes() -> None:
    _, _, weight, bias = data()
    with pytest.raises(TypeError, match="x_pos dtype torch.float32 differs from weight dtype torch.bfloat16"):
        step(weight=weight.bfloat16(), bias=bias.bfloat16())
    x_pos, x_neg, weight, bias = data(torch.bfloat16)
    with pytest.raises(TypeError, match="x_neg dtype torch.float32 differs from weight dtype torch.bfloat16"):
        step(x_pos=x_pos, x_neg=x_neg.float(), weight=weight, bias=bias)
    with pytest.raises(TypeError, match="bias dtype torch.float64 differs from weight dtype torch.float32"):
        step(bias=bias.double())
    with pytest.raises(TypeError, match="bias dtype torch.float32 differs from weight dtype torch.bfloat16"):
        step(x_pos=x_pos, x_neg=x_neg, weight=weight, bias=bias.float())


def test_inputs_on_other_device_than_weight() -> None:
    with pytest.raises(ValueError, match="x_pos is on meta but weight is on cpu"):
        step(x_pos=torch.zeros(P, K, device="meta"))
    with pytest.raises(ValueError, match="bias is on meta but weight is on cpu"):
        step(bias=torch.zeros(N, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# contiguity


def test_weight_non_contiguous_rejected() -> None:
    weight = torch.randn(K, N).t()
    assert not weight.is_contiguous()
    with pytest.raises(ValueError, match="weight must be contiguous"):
        step(weight=weight)
    bias = torch.randn(2 * N)[::2]
    with pytest.raises(ValueError, match="bias must be contiguous"):
        step(bias=bias)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_non_contiguous_inputs_handled(backend) -> None:
    x_pos, x_neg, weight, bias = data()
    xp = torch.randn(K, P).t()  # transposed view
    xn = torch.randn(Q, 2 * K)[:, ::2]  # strided view
    assert not xp.is_contiguous() and not xn.is_contiguous()
    out = ffk.ff_linear_step(xp, xn, weight, bias, backend=backend)
    expected = ffk.ff_linear_step(xp.contiguous(), xn.contiguous(), weight, bias, backend=backend)
    for name in out._fields:
        assert torch.equal(getattr(out, name), getattr(expected, name)), name
    h, g = ffk.ff_linear_forward(xp, weight, bias, backend=backend)
    h2, g2 = ffk.ff_linear_forward(xp.contiguous(), weight, bias, backend=backend)
    assert torch.equal(h, h2) and torch.equal(g, g2)


# ---------------------------------------------------------------------------------------------------------------
# non-finite values


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["x_pos", "x_neg"])
def test_non_finite_inputs_raise(name, value) -> None:
    x = data()[0 if name == "x_pos" else 1].clone()
    x[1, 2] = value
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        step(**{name: x})


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["offset_pos", "offset_neg"])
def test_non_finite_offsets_raise(name, value) -> None:
    off = torch.zeros(P if name == "offset_pos" else Q)
    off[0] = value
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        step(**{name: off})


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["x_pos", "x_neg"])
def test_non_finite_inputs_unchecked(name, value, backend) -> None:
    """ff_linear_step's docstring: with check_finite=False, non-finite inputs give a NaN loss and, with an
    optimizer, NaN parameters."""
    x_pos, x_neg, weight, bias = data()
    (x_pos if name == "x_pos" else x_neg)[1, 2] = value
    out = ffk.ff_linear_step(x_pos, x_neg, weight, bias, check_finite=False, backend=backend)
    assert torch.isnan(out.loss)
    w, b = weight.clone(), bias.clone()
    opt = optim.Adam([w, b], lr=0.01)
    out = ffk.ff_linear_step(x_pos, x_neg, w, b, check_finite=False, optimizer=opt, backend=backend)
    assert torch.isnan(out.loss)
    assert bool(torch.isnan(w).any())


@pytest.mark.parametrize("name", ["offset_pos", "offset_neg"])
def test_non_finite_offsets_unchecked(name) -> None:
    """check_finite=False skips the finiteness scan of every input (the docstring; the error message itself says
    "pass check_finite=False to skip this check"): NaN offsets then give a NaN loss, not an error."""
    off = torch.zeros(P if name == "offset_pos" else Q)
    off[0] = math.nan
    out = step(**{name: off}, check_finite=False, backend="torch")
    assert torch.isnan(out.loss)


def test_forward_non_finite() -> None:
    x = data()[0].clone()
    x[0, 0] = math.nan
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        forward(x=x)
    h, g = forward(x=x, check_finite=False)
    assert torch.isnan(g[0]) and bool(torch.isfinite(g[1:]).all())


# ---------------------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    "name,value",
    [
        ("goodness", "max"),
        ("goodness", "MEAN"),
        ("loss", "hinge"),
        ("normalize", "layer"),
        ("normalize", None),
        ("backend", "metal"),
        ("backend", "Torch"),
    ],
)
def test_unknown_option_strings(name, value) -> None:
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        step(**{name: value})


@pytest.mark.parametrize("name", ["threshold", "eps", "alpha"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "2.0", True, None])
def test_non_finite_or_non_numeric_scalars(name, value) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        step(**{name: value})


@pytest.mark.parametrize("eps", [0.0, -1e-4])
def test_eps_must_be_positive(eps) -> None:
    with pytest.raises(ValueError, match="eps must be positive"):
        step(eps=eps)
    step(eps=eps, normalize="none")  # eps is unused without normalisation


# ---------------------------------------------------------------------------------------------------------------
# backends


def test_cuda_backend_unavailable(monkeypatch) -> None:
    """Where ff_kernels._C was not built, backend='cuda' says so and how to build it."""
    from ff_kernels.ops import cuda_step

    monkeypatch.setattr(cuda_step, "_reason", "the C++/CUDA extension ff_kernels._C is not built (test); "
                        + cuda_step._BUILD_HINT)
    monkeypatch.setattr(cuda_step, "_jit_tried", True)
    monkeypatch.setattr(cuda_step, "_ready", set())
    with pytest.raises(RuntimeError, match=r"backend='cuda' is unavailable: .*not built.*pip install .*-e \."):
        step(backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        forward(backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable: .*(TRITON_INTERPRET|not installed)"):
        backends.resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        step(backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        backends.resolve_backend("triton", torch.device("cpu"))


def test_triton_backend_on_cpu_with_interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = backends.triton_unavailable_reason(torch.device("cpu"))
    if reason is None and backends.triton_ops_available():
        assert backends.resolve_backend("triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
            backends.resolve_backend("triton", torch.device("cpu"))


class _TorchPathCalled(Exception):
    pass


def test_resolved_triton_backend_never_runs_the_torch_path(monkeypatch) -> None:
    """DESIGN 2: "an unavailable backend is a clear error, never a silent fallback". When resolve_backend accepts
    backend='triton', the step and the forward must run Triton kernels, not the closed form of backend='torch'."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        backends.resolve_backend("triton", torch.device("cpu"))
    except RuntimeError:
        pytest.skip("backend='triton' is unavailable here (and that raises, as tested above)")

    def torch_path(*args, **kwargs):
        raise _TorchPathCalled

    monkeypatch.setattr(torch_step, "ff_linear_step_torch", torch_path)
    monkeypatch.setattr(torch_step, "ff_linear_forward_torch", torch_path)
    monkeypatch.setattr(dispatch, "_loaded", {})
    x_pos, x_neg, weight, bias = data()
    try:
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, backend="triton")
    except _TorchPathCalled:
        pytest.fail("ff_linear_step(backend='triton') silently ran the torch backend")
    try:
        ffk.ff_linear_forward(x_pos, weight, bias, backend="triton")
    except _TorchPathCalled:
        pytest.fail("ff_linear_forward(backend='triton') silently ran the torch backend")


def test_auto_backend_cpu_never_triton(monkeypatch) -> None:
    """auto on CPU tensors: the extension's CPU operator where it is built, else the torch backend; never the
    Triton interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    built = backends.cuda_unavailable_reason(torch.device("cpu")) is None
    assert backends.resolve_backend("auto", torch.device("cpu")) == ("cuda" if built else "torch")
    assert backends.resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve_backend("fast", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["reference"])
def test_compute_dtype_is_refused_by_the_reference(backend) -> None:
    supported = "compute_dtype=torch.bfloat16 is supported by backend='torch' or 'triton' or 'cuda' only"
    with pytest.raises(ValueError, match=supported):
        step(compute_dtype=torch.bfloat16, backend=backend)
    with pytest.raises(ValueError, match=supported):
        forward(compute_dtype=torch.bfloat16, backend=backend)
    # the weight dtype itself is always allowed
    step(compute_dtype=torch.float32, backend=backend)


def test_compute_dtype_must_be_floating() -> None:
    with pytest.raises(TypeError, match="compute_dtype must be a floating dtype"):
        step(compute_dtype=torch.int8, backend="torch")
    with pytest.raises(TypeError, match="compute_dtype must be a floating dtype"):
        forward(compute_dtype=torch.int8, backend="torch")


def test_optimizer_must_be_fused() -> None:
    x_pos, x_neg, weight, bias = data()
    with pytest.raises(TypeError, match="optimizer must be an ff_kernels.optim optimizer"):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=torch.optim.Adam([weight, bias]))
    with pytest.raises(TypeError, match="optimizer must be an ff_kernels.optim optimizer.*got str"):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer="adam")


def test_errors_leave_parameters_untouched() -> None:
    x_pos, x_neg, weight, bias = data()
    before = weight.clone()
    opt = optim.SGD([weight, bias], lr=1.0)
    with pytest.raises(ValueError):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=opt, goodness="bad")
    with pytest.raises(ValueError):
        ffk.ff_linear_step(x_pos, x_neg, weight, bias, optimizer=opt, offset_pos=torch.zeros(P + 1))
    assert torch.equal(weight, before)


# ---------------------------------------------------------------------------------------------------------------
# ff_linear_forward's own checks


def test_forward_checks() -> None:
    with pytest.raises(ValueError, match="x has 6 features but weight expects in_features=7"):
        forward(x=torch.randn(3, 6))
    with pytest.raises(ValueError, match="x must have shape"):
        forward(x=torch.randn(K))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        forward(x=torch.ones(3, K, dtype=torch.int64))
    with pytest.raises(TypeError, match="x dtype torch.float64 differs from weight dtype torch.float32"):
        forward(x=torch.randn(3, K, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"bias must have shape \\({N},\\)"):
        forward(bias=torch.randn(N + 1))
    with pytest.raises(ValueError, match="goodness must be one of"):
        forward(goodness="median")
    with pytest.raises(ValueError, match="normalize must be one of"):
        forward(normalize="batch")
    with pytest.raises(ValueError, match="backend must be one of"):
        forward(backend="gpu")


def test_forward_empty_batch_is_defined() -> None:
    h, g = forward(x=torch.randn(0, K))
    assert h.shape == (0, N) and g.shape == (0,)


@pytest.mark.parametrize("eps", [math.nan, math.inf, -1.0, 0.0])
def test_forward_checks_eps(eps) -> None:
    """ff_linear_forward must validate eps as ff_linear_step does (a NaN eps gives NaN goodness silently)."""
    with pytest.raises(ValueError, match="eps must be"):
        forward(eps=eps)


def test_auto_backend_picks_triton_for_cuda_tensors(monkeypatch) -> None:
    """DESIGN 2 / the Triton issue: CUDA tensors get the fused Triton path whenever Triton is importable."""
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: None)
    assert backends.resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: "Triton is not installed")
    assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"


# ------------------------------------------------------------------------------------------------------------------
# Found by an adversarial review: class labels, NaN through ReLU, meta tensors, empty conv batches, dtype mixes.
# ------------------------------------------------------------------------------------------------------------------
def _skip_unless_present(backend: str) -> None:
    """The C++ operator where it is built, Triton where it runs (TRITON_INTERPRET=1 on the CPU, as conftest sets)."""
    from ff_kernels.ops import cuda_step

    if backend == "cuda" and cuda_step.extension_unavailable_reason("cpu") is not None:
        pytest.skip(f"no C++ operator: {cuda_step.extension_unavailable_reason('cpu')}")
    if backend == "triton" and (backends.triton_unavailable_reason(torch.device("cpu")) is not None
                                or not backends.triton_ops_available()):
        pytest.skip("Triton does not run here")


def _class_inputs(rows=4, in_features=8, units=6, num_classes=3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, in_features, generator=gen)
    w, b = torch.randn(units, in_features, generator=gen), torch.randn(units, generator=gen)
    return x, w, b, num_classes


@pytest.mark.parametrize("backend", ["reference", "torch", "cuda", "triton"])
@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("bad", [-1, 3, 255])
def test_class_step_labels_out_of_range_always_raise(backend, check_finite, bad) -> None:
    """An out-of-range label matches no class in the Triton kernels (a silent wrong loss) and fails in ATen's
    gather with an index message elsewhere: checked on every backend whatever check_finite says, naming labels,
    before the weights change."""
    _skip_unless_present(backend)
    x, w, b, classes = _class_inputs()
    labels = torch.tensor([0, bad, 2, 1])
    opt = optim.SGD([w, b], lr=0.1)
    before = w.clone()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ffk.ff_linear_class_step(x, labels, w, b, num_classes=classes, optimizer=opt, backend=backend,
                                 check_finite=check_finite)
    assert torch.equal(w, before)
    images = x.view(4, 2, 2, 2)
    conv_w = torch.randn(6, 2, 1, 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ffk.ff_conv2d_class_step(images, labels, conv_w, None, num_classes=classes, backend=backend,
                                 check_finite=check_finite)


@pytest.mark.parametrize("check_finite", [True, False])
def test_head_loss_labels_out_of_range_raise(check_finite) -> None:
    h, head = torch.randn(4, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ffk.class_goodness_loss(h, head, None, torch.tensor([0, 1, 3, 2]), check_finite=check_finite)


def test_deferred_label_check_names_labels() -> None:
    """The GPU paths fold the labels' range into the deferred finiteness read (ff_kernels.finite)."""
    from ff_kernels import finite

    finite.defer(torch.device("cpu"), (), torch.tensor([0, 2, 5]), 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\); a label outside it was passed"):
        finite.check_now(torch.device("cpu"))
    finite.defer(torch.device("cpu"), (), torch.tensor([0, 2, 1]), 3)
    finite.check_now(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["reference", "torch", "cuda", "triton"])
def test_nan_weight_propagates_through_relu(backend) -> None:
    """torch.relu keeps NaN; so must every backend's (Triton's max used to return 0 for NaN: a finite loss)."""
    _skip_unless_present(backend)
    x_pos, x_neg, w, b = data()
    w[0, 0] = math.nan
    out = ffk.ff_linear_step(x_pos, x_neg, w, b, backend=backend)
    assert torch.isnan(out.h_pos[:, 0]).all() and math.isnan(float(out.loss))
    h, _ = ffk.ff_linear_forward(x_pos, w, b, backend=backend)
    assert torch.isnan(h[:, 0]).all()


def test_meta_tensors_skip_value_checks() -> None:
    """Meta tensors carry shapes only: a step on them infers the output shapes and queues no value check."""
    from ff_kernels import finite

    x_pos, x_neg, w, b = (t.to("meta") for t in data())
    for _ in range(finite.interval() + 1):
        out = ffk.ff_linear_step(x_pos, x_neg, w, b, backend="torch")
    assert out.h_pos.shape == (P, N) and out.h_pos.device.type == "meta"
    g = ffk.class_goodness(torch.randn(4, 5, device="meta"), torch.randn(3, 5, device="meta"))
    assert g.shape == (4, 3)


@pytest.mark.parametrize("backend", ["reference", "torch", "cuda", "auto"])
def test_conv_forward_of_an_empty_batch(backend) -> None:
    _skip_unless_present(backend)
    w = torch.randn(6, 2, 3, 3)
    for classes in (None, 3):
        h, g = ffk.ff_conv2d_forward(torch.randn(0, 2, 8, 8), w, None, num_classes=classes, backend=backend)
        assert h.shape == (0, 6, 6, 6) and g.shape == ((0,) if classes is None else (0, 3))


@pytest.mark.parametrize("backend", ["auto", "torch", "cuda", "reference"])
def test_float64_compute_with_float32_weights_names_compute_dtype(backend) -> None:
    _skip_unless_present(backend)
    with pytest.raises(TypeError, match="compute_dtype=torch.float64 with torch.float32 weights"):
        step(compute_dtype=torch.float64, backend=backend)


def test_triton_refuses_float64_and_auto_avoids_it(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backends.triton_unavailable_reason(torch.device("cpu")) is not None or not backends.triton_ops_available():
        pytest.skip("Triton is not available here")
    x_pos, x_neg, w, b = data(torch.float64)
    with pytest.raises(TypeError, match="weight is torch.float64; backend=.triton. takes float32"):
        ffk.ff_linear_step(x_pos, x_neg, w, b, backend="triton")
    from ff_kernels.functional import route_for

    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device: None)
    route = route_for("linear_step", "auto", torch.float64, w.to("meta"))
    assert "triton" not in route.entry.target


def test_numpy_scalars_are_numbers() -> None:
    np = pytest.importorskip("numpy")
    a = step(threshold=np.float32(2.0), eps=np.float32(1e-4), backend="torch")
    b = step(threshold=2.0, eps=float(np.float32(1e-4)), backend="torch")
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("alpha", [0.0, -4.0])
def test_symba_alpha_must_be_positive(alpha) -> None:
    with pytest.raises(ValueError, match="alpha must be positive for loss='symba'"):
        step(x_neg=data()[1][:P - 1].repeat(2, 1)[:P], loss="symba", alpha=alpha)


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_forward_takes_non_contiguous_parameters(backend) -> None:
    """Inference writes no parameter: a transposed (tied) weight or a channels-last conv module serves."""
    x_pos, _, w, b = data()
    tied = w.t().contiguous().t()
    assert not tied.is_contiguous()
    assert torch.equal(ffk.ff_linear_forward(x_pos, tied, b, backend=backend)[0],
                       ffk.ff_linear_forward(x_pos, w, b, backend=backend)[0])
    conv_w = torch.randn(6, 2, 3, 3)
    images = torch.randn(3, 2, 7, 7)
    last = conv_w.to(memory_format=torch.channels_last)
    assert torch.allclose(ffk.ff_conv2d_forward(images, last, None, backend=backend)[0],
                          ffk.ff_conv2d_forward(images, conv_w, None, backend=backend)[0], atol=1e-6)


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float64])
def test_head_bias_dtype_must_match_the_head(bias_dtype) -> None:
    h, head = torch.randn(4, 5), torch.randn(3, 5)
    with pytest.raises(TypeError, match="head_bias dtype .* differs from head_weight dtype"):
        ffk.class_goodness(h, head, torch.zeros(3, dtype=bias_dtype))
    with pytest.raises(TypeError, match="head_bias dtype .* differs from head_weight dtype"):
        ffk.class_goodness_loss(h, head, torch.zeros(3, dtype=bias_dtype), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("value", ["no", 0, None])
def test_check_finite_must_be_a_bool(value) -> None:
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        step(check_finite=value)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        forward(check_finite=value)
    x, w, b, classes = _class_inputs()
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        ffk.ff_linear_class_step(x, torch.tensor([0, 1, 2, 0]), w, b, num_classes=classes, check_finite=value)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        ffk.class_goodness(torch.randn(4, 5), torch.randn(3, 5), check_finite=value)
