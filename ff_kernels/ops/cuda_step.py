"""The C++/CUDA extension backend (``backend="cuda"``): the ``torch.ops.ff_kernels_ext`` operators.

One extension, two devices (the name is DESIGN 2's: the backend is the compiled extension, whichever device it runs
on):

- CPU tensors: the fused CPU step of ``csrc/cpu`` (``cpu_step_``, ``cpu_forward``), what ``backend="auto"`` picks on
  the CPU wherever the extension is built. Two ATen GEMMs (MKL/oneDNN; bf16 and fp16 with fp32 accumulation) and
  three fused vector passes (row norms with the finiteness scan, and the scaled copy of x where x needs a conversion
  to the compute dtype: an fp32 x goes to the GEMMs as it is, its row scales folded into the next pass; bias, ReLU,
  goodness, loss, coefficients, GEMM 2's operand and grad_b; the optimizer update), each one parallel loop compiled
  for ATen's CPU capability. ``compute_dtype`` runs the GEMMs in another dtype than the parameters' (bf16 with fp32
  master weights). The checks a step needs beyond the public boundary's, the finiteness scan included, are in the
  same call, so a step costs one operator call from Python.
- CUDA tensors: the kernels of ``csrc/cuda`` (GEMM 1 with the row-norm/bias/ReLU/sum-of-squares epilogue, the
  per-row loss and coefficient, GEMM 2 with the optimizer update fused into its epilogue), where the extension was
  built with nvcc. The GEMMs run in the parameters' dtype.

Loading, on first use:

1. ``ff_kernels._C``, built by ``pip install --no-build-isolation -e .`` (see setup.py);
2. else, only when ``FF_KERNELS_JIT=1``, a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load``
   (ninja; cached under ``TORCH_EXTENSIONS_DIR``; needs a source checkout; CUDA kernels too where torch has CUDA
   and nvcc is found, unless ``FF_KERNELS_BUILD_CUDA=0``). It is opt-in because compiling takes minutes.

Otherwise the backend is unavailable and :func:`extension_unavailable_reason` says why and how to build it;
importing ``ff_kernels`` never fails for want of the extension.

Precision on CUDA: fp32 inputs use the exact fp32 (CUDA-core) kernels unless PyTorch's TF32 matmul switch is on
(``torch.backends.cuda.matmul.allow_tf32`` or ``fp32_precision = "tf32"``), then TF32 tensor cores; bf16/fp16
use tensor cores. Accumulation, goodness, loss and optimizer state are fp32 on both devices.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

from ff_kernels._options import StepOptions
from ff_kernels.optim import SGD, Adam, FusedOptimizer
from ff_kernels.types import FFStepOutput

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler, and nvcc with a CUDA build of "
    "torch for the CUDA kernels), or set FF_KERNELS_JIT=1 to compile it on first use"
)


def _jit_build() -> None:
    """Compiles ``csrc/`` with torch's JIT extension loader and loads it (registering the operators)."""
    from torch.utils import cpp_extension

    if not (_CSRC / "ops.cpp").is_file():
        raise RuntimeError(f"no C++ sources at {_CSRC}: JIT builds need a source checkout")
    sources = [_CSRC / "ops.cpp", *sorted((_CSRC / "cpu").glob("*.cpp"))]
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FF_KERNELS_BUILD_CUDA") != "0"
    )
    if with_cuda:
        sources += [*sorted((_CSRC / "cuda").glob("*.cpp")), *sorted((_CSRC / "cuda").glob("*.cu"))]
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []  # as setup.py: at::parallel_for needs it
    warnings = ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]  # as setup.py
    cpp_extension.load(
        name="ff_kernels_ext_cuda" if with_cuda else "ff_kernels_ext_cpu",
        sources=[str(s) for s in sources],
        extra_cflags=["-O3", *warnings, *openmp, f"-DFF_KERNELS_WITH_CUDA={int(with_cuda)}"],
        extra_ldflags=openmp,
        extra_cuda_cflags=["-O3"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FF_KERNELS_JIT_VERBOSE") == "1",
    )


def _load_built() -> str | None:
    """Imports ff_kernels._C (registering the operators): None on success, else why not."""
    try:
        importlib.import_module("ff_kernels._C")
    except ImportError as error:
        return f"the C++/CUDA extension ff_kernels._C is not built ({error}); {_BUILD_HINT}"
    return None


# Loading the built library at import costs a dlopen; doing it here, not on first use, keeps the checks below plain
# reads of module state, which torch.compile traces without graph breaks.
_reason: str | None = _load_built()
_jit_tried = False


def _load() -> str | None:
    """None when the operators are registered, else why not; tries the JIT build once if FF_KERNELS_JIT=1."""
    global _reason, _jit_tried
    if _reason is not None and not _jit_tried and os.environ.get("FF_KERNELS_JIT") == "1":
        _jit_tried = True
        try:
            _jit_build()
        except Exception as error:  # a compiler error, a missing ninja, ...: report it as the reason
            _reason = f"ff_kernels._C is not built and its JIT build (FF_KERNELS_JIT=1) failed: {error}"
        else:
            _reason = None
            _on_loaded()
    return _reason


def extension_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when the extension is usable (for tensors on ``device``, if given); otherwise the reason and the fix."""
    reason = _load()
    if reason is not None or device is None:
        return reason
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the extension runs on CPU and CUDA tensors; the tensors are on {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available (no GPU, or a CPU-only build of torch)"
    if not _with_cuda:
        return (
            "ff_kernels._C was built without its CUDA kernels (torch without CUDA, or nvcc not found, at build "
            f"time); {_BUILD_HINT}"
        )
    return None


_ready: set[str] = set()  # device types that passed the check


def require_extension(device: torch.device) -> None:
    """Raises RuntimeError saying why when the extension cannot run on ``device`` (checked once per device type)."""
    if device.type in _ready:
        return
    reason = extension_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' is unavailable: {reason}")
    _ready.add(device.type)


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) implementations, so that torch.compile and FakeTensor tracing see the operators' output shapes.
# ---------------------------------------------------------------------------------------------------------------
def _step_outputs(x_pos: torch.Tensor, x_neg: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    rows = x_pos.shape[0] + x_neg.shape[0]
    acc = torch.promote_types(w.dtype, torch.float32)
    return (
        x_pos.new_empty((), dtype=acc),
        x_pos.new_empty((rows,), dtype=acc),
        x_pos.new_empty((rows, w.shape[0])),
    )


def _on_loaded() -> None:
    """Runs once the operators are registered: records the build's CUDA support and registers the fakes."""
    global _with_cuda
    _with_cuda = bool(torch.ops.ff_kernels_ext.with_cuda())
    register = torch.library.register_fake

    @register("ff_kernels_ext::forward")
    def _(x, w, b, kappa, normalize, eps, allow_tf32):
        acc = torch.promote_types(w.dtype, torch.float32)
        return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0],), dtype=acc)

    @register("ff_kernels_ext::step")
    def _(x_pos, x_neg, w, b, *args):
        grad_b = w.new_empty((0,)) if b is None else torch.empty_like(b)
        return (*_step_outputs(x_pos, x_neg, w), torch.empty_like(w), grad_b)

    @register("ff_kernels_ext::step_sgd_")
    def _(x_pos, x_neg, w, b, *args):
        return _step_outputs(x_pos, x_neg, w)

    @register("ff_kernels_ext::step_adam_")
    def _(x_pos, x_neg, w, b, *args):
        return _step_outputs(x_pos, x_neg, w)

    @register("ff_kernels_ext::cpu_step_")
    def _(x_pos, x_neg, w, b, offset_pos, offset_neg, threshold, kappa, loss, normalize, eps, alpha, compute_dtype,
          check_finite, optimizer, state, hyper):
        acc = torch.promote_types(compute_dtype, torch.float32)
        grad_w = torch.empty_like(w) if optimizer == 0 else w.new_empty((0,))
        grad_b = torch.empty_like(b) if optimizer == 0 and b is not None else w.new_empty((0,))
        return (
            w.new_empty((), dtype=acc),
            w.new_empty((x_pos.shape[0],), dtype=acc),
            w.new_empty((x_neg.shape[0],), dtype=acc),
            w.new_empty((x_pos.shape[0] + x_neg.shape[0], w.shape[0]), dtype=compute_dtype),
            grad_w,
            grad_b,
        )

    @register("ff_kernels_ext::cpu_forward")
    def _(x, w, b, kappa, normalize, eps, compute_dtype, check_finite):
        acc = torch.promote_types(compute_dtype, torch.float32)
        return x.new_empty((x.shape[0], w.shape[0]), dtype=compute_dtype), x.new_empty((x.shape[0],), dtype=acc)

    @register("ff_kernels_ext::cpu_mm")
    def _(a, b):
        return a.new_empty((a.shape[0], b.shape[1]))

    @register("ff_kernels_ext::cpu_group_goodness")
    def _(h, groups, kappa):
        return h.new_empty((h.shape[0], groups), dtype=torch.promote_types(h.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# The functions ff_kernels.functional calls (inputs already checked there).
# ---------------------------------------------------------------------------------------------------------------
def _tf32_allowed(t: torch.Tensor) -> bool:
    """TF32 tensor cores for fp32 CUDA tensors only when PyTorch's matmul switch allows them. ``fp32_precision``
    reflects both APIs (reading the legacy ``allow_tf32`` raises once the new one has been used)."""
    if t.dtype != torch.float32 or t.device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _optimizer_args(
    optimizer: FusedOptimizer | None, w: torch.Tensor, b: torch.Tensor | None
) -> tuple[int, list[torch.Tensor], list[float]]:
    """``cpu_step_``'s (optimizer, state, hyper) for an ff_kernels.optim optimizer (layouts in csrc/ops.cpp);
    advances its state for the step, as the fused update is applied (:func:`_undo_optimizer_args` takes it back)."""
    if optimizer is None:
        return 0, [], []
    if isinstance(optimizer, SGD):
        bufs, firsts = optimizer.fused_state(w, b)
        hyper = [optimizer.lr, optimizer.momentum, optimizer.dampening, optimizer.weight_decay, optimizer.nesterov,
                 *firsts]
        return 1, [t for t in bufs if t is not None], hyper
    if isinstance(optimizer, Adam):
        moments, corrections = optimizer.fused_state(w, b)
        hyper = [optimizer.lr, *optimizer.betas, optimizer.eps, optimizer.weight_decay,
                 optimizer.decoupled_weight_decay, *corrections]
        return 2, [t for t in moments if t is not None], hyper
    raise TypeError(f"the cuda backend has no fused update for {type(optimizer).__name__}")


def _undo_optimizer_args(optimizer: FusedOptimizer, w: torch.Tensor, b: torch.Tensor | None, hyper: list) -> None:
    """Take back what :func:`_optimizer_args` advanced, for a step the operator refused before writing anything:
    Adam's step count (a first step's state goes entirely), SGD's momentum buffers created for a first step."""
    for i, (name, p) in enumerate((("weight", w), ("bias", b))):
        if p is None:
            continue
        state = optimizer.check_holds(name, p)
        if isinstance(optimizer, Adam):
            state["step"] -= 1
            if state["step"] == 0:
                state.clear()
        elif hyper[5 + i]:
            del state["momentum_buffer"]


def ff_linear_step_cuda(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None = None,
    offset_neg: torch.Tensor | None = None,
    optimizer: FusedOptimizer | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = False,
) -> FFStepOutput:
    """One FF layer step through the extension; with an optimizer, the update is applied in place and the gradients
    are not returned.

    ``compute_dtype`` (default: w's dtype) and ``check_finite`` (a ValueError naming the input or offset that holds a
    NaN or an infinity, raised before anything is written) are the CPU operator's; the CUDA kernels run in w's dtype
    and leave the finiteness check to ``ff_kernels.functional``, which never asks them for it."""
    require_extension(w.device)
    if w.device.type == "cpu":
        return _cpu_step(x_pos, x_neg, w, b, opts, offset_pos, offset_neg, optimizer, compute_dtype, check_finite)
    _check_cuda_options(w, compute_dtype, check_finite)
    ops = torch.ops.ff_kernels_ext
    rows_pos = x_pos.shape[0]
    step_args = (
        offset_pos, offset_neg, opts.threshold, opts.kappa, opts.loss, opts.normalize, opts.eps, opts.alpha,
        _tf32_allowed(w),
    )
    grad_w = grad_b = None
    if optimizer is None:
        loss, g, h, grad_w, gb = ops.step(x_pos, x_neg, w, b, *step_args)
        grad_b = None if b is None else gb
    else:
        if isinstance(optimizer, SGD):
            bufs, firsts = optimizer.fused_state(w, b)
            loss, g, h = ops.step_sgd_(
                x_pos, x_neg, w, b, *step_args, bufs[0], bufs[1], float(optimizer.lr), float(optimizer.momentum),
                float(optimizer.dampening), float(optimizer.weight_decay), bool(optimizer.nesterov),
                firsts[0], firsts[1],
            )
        elif isinstance(optimizer, Adam):
            moments, corrections = optimizer.fused_state(w, b)
            beta1, beta2 = optimizer.betas
            loss, g, h = ops.step_adam_(
                x_pos, x_neg, w, b, *step_args, *moments, float(optimizer.lr), float(beta1), float(beta2),
                float(optimizer.eps), float(optimizer.weight_decay), bool(optimizer.decoupled_weight_decay),
                *corrections,
            )
        else:
            raise TypeError(f"the cuda backend has no fused update for {type(optimizer).__name__}")
    return FFStepOutput.from_stacked(loss, g, h, rows_pos, grad_w, grad_b)


def _cpu_step(
    x_pos: torch.Tensor,
    x_neg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    opts: StepOptions,
    offset_pos: torch.Tensor | None,
    offset_neg: torch.Tensor | None,
    optimizer: FusedOptimizer | None,
    compute_dtype: torch.dtype | None,
    check_finite: bool,
) -> FFStepOutput:
    """One call of the fused CPU operator. Its checks (the finiteness scan among them) raise before it writes
    anything, but the optimizer has already advanced its state for the step: that is taken back, so a step refused
    for a NaN input leaves the optimizer as it was."""
    kind, state, hyper = _optimizer_args(optimizer, w, b)
    try:
        loss, g_pos, g_neg, h, grad_w, grad_b = torch.ops.ff_kernels_ext.cpu_step_.default(
            x_pos, x_neg, w, b, offset_pos, offset_neg, opts.threshold, opts.kappa, opts.loss, opts.normalize,
            opts.eps, opts.alpha, w.dtype if compute_dtype is None else compute_dtype, check_finite, kind, state,
            hyper,
        )
    except ValueError:
        if optimizer is not None:
            _undo_optimizer_args(optimizer, w, b, hyper)
        raise
    h_pos, h_neg = torch.split_with_sizes(h, (x_pos.shape[0], x_neg.shape[0]))  # one dispatch for both views
    if optimizer is not None:
        return FFStepOutput(loss, g_pos, g_neg, h_pos, h_neg, None, None)
    return FFStepOutput(loss, g_pos, g_neg, h_pos, h_neg, grad_w, None if b is None else grad_b)


def cpu_kernels() -> str:
    """The CPU capability the fused CPU passes run with on this machine ("AVX512", "AVX2" or "DEFAULT": ATen's,
    which ``ATEN_CPU_CAPABILITY`` overrides; "AVX512_BF16" for AVX512 on a CPU with AVX512-BF16)."""
    require_extension(torch.device("cpu"))
    return torch.ops.ff_kernels_ext.cpu_kernels()


def cpu_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` through the fused CPU step's GEMM (``cpu_gemm_library``): the floor of that path's two GEMMs."""
    require_extension(torch.device("cpu"))
    return torch.ops.ff_kernels_ext.cpu_mm(a, b)


def cpu_gemm_library() -> str:
    """The library the fused CPU step's fp32 GEMMs run in on this machine: "onednn" (x86 CPUs other than Intel's,
    where ATen's MKL is slower) or "aten" (ATen's mm); ``FF_KERNELS_CPU_GEMM=aten|onednn`` overrides it."""
    require_extension(torch.device("cpu"))
    return torch.ops.ff_kernels_ext.cpu_gemm_library()


def _check_cuda_options(w: torch.Tensor, compute_dtype: torch.dtype | None, check_finite: bool) -> None:
    if compute_dtype is not None and compute_dtype != w.dtype:
        raise NotImplementedError(
            f"the extension's CUDA kernels run in the parameters' dtype ({w.dtype}); compute_dtype={compute_dtype} "
            "is the CPU operator's (or backend='torch')"
        )
    if check_finite:
        raise NotImplementedError("the extension's CUDA kernels do not scan for NaN/inf; ff_kernels.functional does")


def ff_linear_forward_cuda(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    *,
    kappa: float,
    normalize: str,
    eps: float,
    compute_dtype: torch.dtype | None = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference, GEMM 1 alone: h (in the compute dtype) and goodness g (fp32), DESIGN 1.1-1.3; ``compute_dtype``
    and ``check_finite`` as in :func:`ff_linear_step_cuda`."""
    require_extension(w.device)
    if w.device.type == "cpu":
        compute = w.dtype if compute_dtype is None else compute_dtype
        return torch.ops.ff_kernels_ext.cpu_forward.default(x, w, b, kappa, normalize, eps, compute, check_finite)
    _check_cuda_options(w, compute_dtype, check_finite)
    return torch.ops.ff_kernels_ext.forward(x, w, b, kappa, normalize, eps, _tf32_allowed(w))


_with_cuda = False
if _reason is None:
    _on_loaded()
