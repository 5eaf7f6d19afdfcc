"""Worker side: a fused step runs on CPU tensors with every Triton launch intercepted, and each launch becomes what
``triton.compile`` would be handed for it (specialisation, autotune configs, options), its programs and its binary's
key. Runs in fresh processes where the kernels are imported without the interpreter."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import pkgutil
from collections.abc import Iterator, Sequence
from inspect import signature
from typing import Any, NamedTuple

import torch

from ff_kernels.inspect.arch import ARCHS
from ff_kernels.inspect.cache import _cache_key
from ff_kernels.inspect.targets import PRECISION_DTYPES, ConvSpec, HeadSpec, Selection, StepSpec, TritonJob


class Launch(NamedTuple):
    kernel: Any  # the launched object: a triton Autotuner or JITFunction
    args: tuple
    kwargs: dict
    grid: Any


def _package_kernels() -> list[Any]:
    """Every Triton kernel object defined in (or imported into) the modules of ``ff_kernels.ops.triton``."""
    from triton.runtime.jit import KernelInterface

    import ff_kernels.ops.triton as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, KernelInterface):
                found[id(value)] = value
    return list(found.values())


def _jit_function(kernel: Any) -> Any:
    """The JITFunction under an autotuner (or any other wrapper)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def _intercepted_launches() -> Iterator[list[Launch]]:
    """Every kernel records its launches instead of running; an autotuner reports the first config it would try
    as the best, for launchers that read it after the launch. Only ever used in a worker process."""
    from triton.runtime.autotuner import Autotuner

    kernels = _package_kernels()
    launches: list[Launch] = []

    def recorder(kernel: Any):
        def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            launches.append(Launch(kernel, args, kwargs, grid))
            if isinstance(kernel, Autotuner):
                kernel.best_config = next(iter(_configs(launches[-1]).values()))

        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)  # the instance attribute shadows the method that would launch
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """PyTorch's fp32 matmul switch, which the launchers read to choose TF32 or exact fp32."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"  # older torch: allow_tf32 only
    saved = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if enabled else "ieee") if name == "fp32_precision" else enabled)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


@functools.lru_cache(maxsize=2)
def _capture_step(spec: StepSpec) -> tuple[Launch, ...]:
    """The Triton launches of one fused step with the package's default options, on uninitialised CPU tensors
    (never read: nothing runs), through the same entry point ``backend="triton"`` uses."""
    from ff_kernels import functional, optim
    from ff_kernels._options import check_step_options
    from ff_kernels.ops.triton.ops import ff_linear_step_triton

    if isinstance(spec, HeadSpec):
        return _capture_head(spec)
    if isinstance(spec, ConvSpec):
        return _capture_conv(spec)
    dtype = PRECISION_DTYPES[spec.precision]
    x_pos = torch.empty(spec.rows, spec.in_features, dtype=dtype)
    x_neg = torch.empty(spec.rows, spec.in_features, dtype=dtype)
    weight = torch.empty(spec.out_features, spec.in_features, dtype=dtype)
    bias = torch.empty(spec.out_features, dtype=dtype)
    defaults = signature(functional.ff_linear_step).parameters
    opts = check_step_options(
        **{name: defaults[name].default for name in ("threshold", "goodness", "loss", "normalize", "eps", "alpha")},
        out_features=spec.out_features,
    )
    optimizers = {
        "none": lambda params: None,
        "sgd": lambda params: optim.SGD(params, lr=1e-3, momentum=0.9),
        "adam": lambda params: optim.Adam(params, lr=1e-3),
    }
    with _tf32(spec.precision == "tf32"), _intercepted_launches() as launches:
        ff_linear_step_triton(x_pos, x_neg, weight, bias, opts, optimizer=optimizers[spec.optimizer]([weight, bias]))
        if dtype != torch.float32:  # the same GEMMs over fp32 master weights (compute_dtype): an fp32 epilogue
            master, master_bias = weight.float(), bias.float()
            ff_linear_step_triton(x_pos, x_neg, master, master_bias, opts,
                                  optimizer=optimizers[spec.optimizer]([master, master_bias]), compute_dtype=dtype)
    return tuple(launches)


def _capture_head(spec: HeadSpec) -> tuple[Launch, ...]:
    """The launches of one class-goodness head loss, forward and backward (all three gradients), and of its
    prediction (goodness alone), through the custom ops' implementations, on uninitialised CPU tensors."""
    from ff_kernels.ops.triton import class_goodness

    dtype = PRECISION_DTYPES[spec.precision]
    h = torch.empty(spec.rows, spec.in_features, spec.height, spec.width, dtype=dtype)
    weight = torch.empty(spec.out_features, spec.in_features, dtype=dtype)
    bias = torch.empty(spec.out_features, dtype=dtype)
    labels = torch.zeros(spec.rows, dtype=torch.int64)
    with _tf32(spec.precision == "tf32"), _intercepted_launches() as launches:
        _, _, a, d = class_goodness._loss_forward(h, weight, bias, labels, 1.0)
        class_goodness._loss_backward(torch.ones(()), h, weight, a, d, 1.0, [True, True, True])
        class_goodness._goodness(h, weight, bias)
    return tuple(launches)


def _capture_conv(spec: ConvSpec) -> tuple[Launch, ...]:
    """The launches of one conv layer's positive/negative step and class-goodness step with the public functions'
    default options, through the entry points ``backend="triton"`` uses, on uninitialised CPU tensors."""
    from ff_kernels import conv, optim
    from ff_kernels._options import ConvGeometry, check_class_options, check_step_options
    from ff_kernels.ops.triton.conv_ops import ff_conv2d_class_step_triton, ff_conv2d_step_triton

    dtype = PRECISION_DTYPES[spec.precision]
    images = (spec.rows, spec.in_channels, spec.size, spec.size)
    x_pos, x_neg = torch.empty(images, dtype=dtype), torch.empty(images, dtype=dtype)
    weight = torch.empty(spec.out_features, spec.in_channels, spec.kernel, spec.kernel, dtype=dtype)
    bias = torch.empty(spec.out_features, dtype=dtype)
    geometry = ConvGeometry((1, 1), (spec.kernel // 2,) * 2, (1, 1))
    positions = math.prod(geometry.output_size((spec.size, spec.size), (spec.kernel, spec.kernel)))
    step_defaults = signature(conv.ff_conv2d_step).parameters
    opts = check_step_options(
        **{name: step_defaults[name].default for name in ("threshold", "goodness", "loss", "normalize", "eps",
                                                           "alpha")},
        out_features=spec.out_features * positions,
    )
    class_defaults = signature(conv.ff_conv2d_class_step).parameters
    class_opts = check_class_options(
        **{name: class_defaults[name].default for name in ("goodness", "temperature", "normalize", "eps")},
        num_classes=2, channels=spec.out_features, positions=positions,
    )
    make_optimizer = {
        "none": lambda params: None,
        "sgd": lambda params: optim.SGD(params, lr=1e-3, momentum=0.9),
        "adam": lambda params: optim.Adam(params, lr=1e-3),
    }[spec.optimizer]
    labels = torch.zeros(spec.rows, dtype=torch.int64)
    # The layer's own dtype, then (bf16, fp16) the same GEMMs over fp32 master weights (compute_dtype).
    layers = [(weight, bias, None)]
    if dtype != torch.float32:
        layers.append((weight.float(), bias.float(), dtype))
    with _tf32(spec.precision == "tf32"), _intercepted_launches() as launches:
        for w, b, compute in layers:
            optimizer = make_optimizer([w, b])
            ff_conv2d_step_triton(x_pos, x_neg, w, b, opts, geometry, optimizer=optimizer, compute_dtype=compute)
            ff_conv2d_class_step_triton(x_pos, labels, w, b, class_opts, geometry, optimizer=optimizer,
                                        compute_dtype=compute)
    return tuple(launches)


def _configs(launch: Launch) -> dict[int, Any]:
    """The autotune configs this launch would try (after the autotuner's own pruning, which may depend on the
    precision and shape), keyed by their index in the autotuner's list; ``{-1: None}`` if not autotuned."""
    from triton.runtime.autotuner import Autotuner

    kernel = launch.kernel
    if not isinstance(kernel, Autotuner):
        return {-1: None}
    kernel.nargs = dict(zip(kernel.arg_names, launch.args))
    try:
        kept = {id(config) for config in kernel.prune_configs(launch.kwargs)}
    finally:
        kernel.nargs = None
    return {index: config for index, config in enumerate(kernel.configs) if id(config) in kept}


def _compile_inputs(launch: Launch, config: Any, arch: str) -> tuple[Any, Any, Any, Any]:
    """What ``JITFunction.run`` would hand ``triton.compile`` for this launch under ``config`` on ``arch``: the
    ASTSource (signature, constexprs, divisibility attributes, from Triton's own argument binder), target,
    backend and options."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.kernel)
    target = GPUTarget("cuda", ARCHS[arch].capability, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **(config.all_kwargs() if config is not None else {})}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, sig, constexprs, attrs), target, backend, options


def _abbreviation(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def _config_label(launch: Launch, config: Any, options: Any) -> str:
    """``BM128 BN64 BK64 w4 s4``: the config's constexprs abbreviated (for a kernel that is not autotuned, the
    BLOCK* constexprs its launcher passes), warps and pipeline stages."""
    if config is not None:
        values = config.kwargs
    else:
        values = {name: value for name, value in launch.kwargs.items() if name.startswith("BLOCK")}
    parts = [f"{_abbreviation(name)}{value}" for name, value in values.items()]
    registers = [f"r{options.maxnreg}"] if getattr(options, "maxnreg", None) else []
    return " ".join([*parts, f"w{options.num_warps}", f"s{options.num_stages}", *registers])


def _planned_blocks(kernel: str, precision: str, config: Any) -> int | None:
    """The resident blocks per SM that GEMM 2's row split plans its wave with (``resident_blocks``), which the
    "planner" gate holds against the measured occupancy; None for the other kernels."""
    if kernel != "ff_grad_update_kernel" or config is None:
        return None
    from ff_kernels.ops.triton.grad_update_gemm import resident_blocks

    return resident_blocks(precision, config.kwargs)


def _programs(launch: Launch, config: Any) -> int:
    """Programs per launch, from the launcher's own grid (a tuple, or a function of the launch's meta-parameters)."""
    grid = launch.grid
    if callable(grid):
        fn = _jit_function(launch.kernel)
        meta = {**dict(zip(fn.arg_names, launch.args)), **launch.kwargs}
        grid = grid({**meta, **(config.all_kwargs() if config is not None else {})})
    return math.prod(grid)


def _plan(specs: Sequence[StepSpec], selection: Selection) -> tuple[dict[str, dict], list[dict]]:
    """The distinct binaries to compile (by cache key, with the precisions, optimizers and shapes they serve) and
    every launch (kernel, shape, config, programs, and its binary's key per arch)."""
    binaries: dict[str, dict] = {}
    launches: list[dict] = []
    for spec in specs:
        for index, launch in enumerate(_capture_step(spec)):
            name = _jit_function(launch.kernel).__name__
            if not selection.wants_kernel(name):
                continue
            for position, (config_index, config) in enumerate(_configs(launch).items()):
                if selection.configs and position not in selection.configs:
                    continue
                keys, label = {}, ""
                for arch in selection.archs:
                    source, _, backend, options = _compile_inputs(launch, config, arch)
                    key = _cache_key(source, backend, options)
                    label = _config_label(launch, config, options)
                    job = TritonJob(spec, index, config_index, arch)
                    entry = binaries.setdefault(key, {
                        "job": job, "kernel": name, "config": label, "arch": arch,
                        "num_warps": options.num_warps, "num_stages": options.num_stages,
                        "dtypes": [], "optimizers": [], "layers": [], "rows": [],
                    })
                    for field_name, value in (("dtypes", spec.precision), ("optimizers", spec.optimizer),
                                              ("layers", f"{spec.in_features}x{spec.out_features}"),
                                              ("rows", spec.rows)):
                        if value not in entry[field_name]:
                            entry[field_name].append(value)
                    keys[arch] = key
                launches.append({
                    "kernel": name, "P": spec.rows, "Q": spec.rows, "K": spec.in_features,
                    "N": spec.out_features, "config": label, "dtype": spec.precision,
                    "optimizer": spec.optimizer, "programs": _programs(launch, config), "binaries": keys,
                    "planned_blocks_per_sm": _planned_blocks(name, spec.precision, config),
                })
    return binaries, launches
