"""``ff-kernels inspect``: what the GPU kernels compile to, checked without a GPU (DESIGN section 10).

Triton: a fused step (``ff_kernels.ops.triton``) runs on CPU tensors with every Triton launch intercepted, for each
DESIGN 4 shape, precision (bf16, fp16, tf32 = fp32 inputs on TF32 tensor cores, ieee = exact fp32) and fused
optimizer (none, SGD with momentum, Adam). Each launch is specialised exactly as Triton would specialise it (the
argument types, constexprs and divisibility-by-16 hints: a 500-wide layer or 25000 rows compile differently), and
every autotune config of every distinct specialisation is compiled ahead of time for sm_80 and sm_90. CUDA: every
kernel instantiation in csrc/**/*.cu, compiled by nvcc with ptxas's resource report.

Per binary: registers, spill bytes, shared memory against the arch's opt-in limit, the MMA instruction (wgmma,
mma.sync or none), cp.async and TMA instruction counts, theoretical occupancy. Per Triton launch at each DESIGN 4
shape: the programs and the waves on an H100's 132 SMs. ``--gates`` exits non-zero when a gate fails.

Compiles run in a pool of fresh processes (the kernels are imported there without TRITON_INTERPRET, so this also
works from the test suite) and are cached on disk under Triton's own cache key (source and its dependencies,
specialisation, options, compiler) or, for nvcc, the hash of the CUDA sources.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import math
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from inspect import signature
from itertools import product
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ff_kernels.bench import DESIGN_KN, DESIGN_ROWS, kn_pair, positive_int

H100_SMS = 132
CSRC = Path(__file__).resolve().parents[1] / "csrc"
PRECISIONS = ("bf16", "fp16", "tf32", "ieee")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "ieee": torch.float32}
OPTIMIZERS = ("none", "sgd", "adam")
# What torch.utils.cpp_extension passes to nvcc (tests/test_nvcc.py compiles with the same flags).
NVCC_FLAGS = (
    "-std=c++17",
    "-O3",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)
RECORD_VERSION = 1  # bump when the cached metrics change shape


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA C++ Programming Guide, "Technical Specifications per Compute
    Capability"; NVIDIA A100 and H100 tuning guides): 64K registers, 2048 threads and 32 blocks per SM on both;
    shared memory 164 KB per SM / 163 KB opt-in per block on sm_80, 228 KB / 227 KB on sm_90; 1 KB of each
    block's shared memory reserved by the system (cudaDevAttrReservedSharedMemoryPerBlock)."""

    capability: int
    shared_per_block: int
    shared_per_sm: int
    reserved_shared: int = 1024
    registers: int = 65536
    threads: int = 2048
    blocks: int = 32


ARCHS = {
    "sm_80": Arch(80, shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    "sm_90": Arch(90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}


def occupancy(arch: str, registers: int, shared: int, warps: int) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them, by the rules of the toolkit's cuda_occupancy.h:
    registers go to warps in units of 256 and are split over the SM's 4 sub-partitions, shared memory goes to
    blocks in units of 128 bytes (plus the reserved 1 KB), the largest carveout is assumed."""
    limits = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_per_partition = limits.registers // 4 // regs_per_warp
    by_registers = 0 if regs_per_warp * -(-warps // 4) * 4 > limits.registers else warps_per_partition * 4 // warps
    shared_per_block = -(-(shared + limits.reserved_shared) // 128) * 128
    by_shared = limits.shared_per_sm // shared_per_block if shared <= limits.shared_per_block else 0
    candidates = {
        "blocks": limits.blocks,
        "threads": limits.threads // (32 * warps),
        "registers": by_registers,
        "shared": by_shared,
    }
    limiter = min(candidates, key=lambda name: candidates[name])
    return candidates[limiter], limiter


# ---------------------------------------------------------------------------------------------------------------
# What to inspect
# ---------------------------------------------------------------------------------------------------------------
# Conv layers (DESIGN 7) at CIFAR size, batch 128, 3x3 with padding 1: (B, C_in, C, H = W, kernel), the first layer
# and a 64 -> 128 layer after one pooling.
CONV_SHAPES = ((128, 3, 64, 32, 3), (128, 64, 128, 16, 3))


@dataclass(frozen=True)
class Selection:
    """The filters: kernel name substrings (empty: all), archs, precisions, optimizers, P = Q row counts, (K, N)
    layers, positions in each launch's autotune candidates (empty: all), sources (triton, cuda) and the conv
    layers (``CONV_SHAPES``' format; empty: none)."""

    kernels: tuple[str, ...] = ()
    archs: tuple[str, ...] = tuple(ARCHS)
    precisions: tuple[str, ...] = PRECISIONS
    optimizers: tuple[str, ...] = OPTIMIZERS
    rows: tuple[int, ...] = DESIGN_ROWS
    layers: tuple[tuple[int, int], ...] = DESIGN_KN
    configs: tuple[int, ...] = ()
    sources: tuple[str, ...] = ("triton", "cuda")
    conv_layers: tuple[tuple[int, int, int, int, int], ...] = CONV_SHAPES

    def wants_kernel(self, name: str) -> bool:
        return not self.kernels or any(part in name for part in self.kernels)


# The CI subset: both GEMMs (GEMM 2 with the Adam epilogue) and the row kernel, bf16, first config, sm_90, the
# 784x500 layer (500-wide, so the async-copy gate applies) at P = Q = 4096 (one wave is gated there): 3 compiles.
SUBSETS = {
    "ci": Selection(
        archs=("sm_90",), precisions=("bf16",), optimizers=("adam",), rows=(4096,), layers=((784, 500),),
        configs=(0,), sources=("triton",), conv_layers=(),
    ),
}


class StepSpec(NamedTuple):
    """One fused step whose launches are captured: precision, optimizer, P = Q rows, K inputs, N outputs."""

    precision: str
    optimizer: str
    rows: int
    in_features: int
    out_features: int


class HeadSpec(NamedTuple):
    """One block-wise head (DESIGN 8) whose class-goodness forward and backward launches are captured: precision,
    ``optimizer`` always "none" (the head hands its gradients to autograd), B rows, C channels, K classes, H x W."""

    precision: str
    optimizer: str
    rows: int
    in_features: int
    out_features: int
    height: int
    width: int


# ResNet-18 block outputs at CIFAR size, batch 128, into a 10-class head: the first and the last stage.
HEAD_SHAPES = ((128, 64, 32, 32, 10), (128, 512, 4, 4, 10))


class ConvSpec(NamedTuple):
    """One conv layer (DESIGN 7) whose positive/negative step (P = Q = ``rows``) and class-goodness step (B =
    ``rows``, 2 classes) are captured: precision, optimizer, rows, the GEMMs' K = C_in kh kw and N = C, then C_in,
    the image size H = W and the kernel size (padding kernel // 2)."""

    precision: str
    optimizer: str
    rows: int
    in_features: int
    out_features: int
    in_channels: int
    size: int
    kernel: int


class TritonJob(NamedTuple):
    """One compile: launch ``launch`` of the step ``spec`` under autotune config ``config`` (-1: not autotuned)."""

    spec: StepSpec
    launch: int
    config: int
    arch: str


# ---------------------------------------------------------------------------------------------------------------
# Worker side: runs in fresh processes where the kernels are imported without the interpreter.
# ---------------------------------------------------------------------------------------------------------------
class Launch(NamedTuple):
    kernel: Any  # the launched object: a triton Autotuner or JITFunction
    args: tuple
    kwargs: dict
    grid: Any


def _worker_init(triton_cache: str) -> None:
    """Compile for real (no interpreter), into a throw-away Triton cache, one CPU thread each."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    torch.set_num_threads(1)


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
    optimizer = {
        "none": lambda: None,
        "sgd": lambda: optim.SGD([weight, bias], lr=1e-3, momentum=0.9),
        "adam": lambda: optim.Adam([weight, bias], lr=1e-3),
    }[spec.optimizer]()
    with _tf32(spec.precision == "tf32"), _intercepted_launches() as launches:
        ff_linear_step_triton(x_pos, x_neg, weight, bias, opts, optimizer=optimizer)
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
    optimizer = {
        "none": lambda: None,
        "sgd": lambda: optim.SGD([weight, bias], lr=1e-3, momentum=0.9),
        "adam": lambda: optim.Adam([weight, bias], lr=1e-3),
    }[spec.optimizer]()
    labels = torch.zeros(spec.rows, dtype=torch.int64)
    with _tf32(spec.precision == "tf32"), _intercepted_launches() as launches:
        ff_conv2d_step_triton(x_pos, x_neg, weight, bias, opts, geometry, optimizer=optimizer)
        ff_conv2d_class_step_triton(x_pos, labels, weight, bias, class_opts, geometry, optimizer=optimizer)
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


def _cache_key(source: Any, backend: Any, options: Any) -> str:
    """Triton's key of the binary (source and dependencies, specialisation, options, compiler versions)."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import get_cache_key

    key = get_cache_key(source, backend, options, get_cache_invalidating_env_vars())
    return hashlib.sha256(f"inspect-v{RECORD_VERSION}-{key}".encode()).hexdigest()


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


def _plan_job(specs: Sequence[StepSpec], selection: Selection) -> tuple[dict[str, dict], list[dict]]:
    """``_plan`` in a worker, which then frees the captured steps' tensors before it compiles."""
    try:
        return _plan(specs, selection)
    finally:
        _capture_step.cache_clear()


PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas ``-v`` output (as printed by nvcc --resource-usage or Triton's TRITON_DUMP_PTXAS_LOG) per entry
    function: registers, spill store and load bytes, stack frame and static shared memory."""
    entries: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if match := PTXAS_ENTRY.search(line):
            current = entries.setdefault(match.group(1), {
                "registers": 0, "spill_bytes": 0, "spill_loads": 0, "stack_bytes": 0, "static_shared": 0,
            })
        elif current is not None and (match := PTXAS_FRAME.search(line)):
            current["stack_bytes"], current["spill_bytes"], current["spill_loads"] = map(int, match.groups())
        elif current is not None and (match := PTXAS_USED.search(line)):
            current["registers"] = int(match.group(1))
            current["static_shared"] = int(match.group(2) or 0)
    return entries


ASYNC_COPY = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.c[ag]\.", re.MULTILINE)
TMA_COPY = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.bulk\.tensor\.", re.MULTILINE)


def ptx_instructions(ptx: str) -> dict[str, Any]:
    """The MMA instruction (wgmma, mma.sync, which WMMA also lowers to, or none) and the static counts of
    cp.async (LDGSTS) and TMA (cp.async.bulk.tensor) copies in one function's PTX."""
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "none"
    return {"mma": mma, "async_copies": len(ASYNC_COPY.findall(ptx)), "tma": len(TMA_COPY.findall(ptx))}


def _compile_triton(job: TritonJob) -> dict[str, Any]:
    """Compile one binary; its ptxas report and PTX give the metrics. A failure is reported, not raised."""
    import triton
    from triton import knobs

    launch = _capture_step(job.spec)[job.launch]
    config = _configs(launch)[job.config]
    source, target, _, options = _compile_inputs(launch, config, job.arch)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options.__dict__)
    except Exception as err:  # ptxas or lowering failures become a failed gate with the message
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
    entries = parse_ptxas(log.getvalue())
    if len(entries) != 1:
        return {"error": f"expected one ptxas report, found {len(entries)}"}
    metrics = next(iter(entries.values()))
    metrics.pop("static_shared")  # Triton sizes all its shared memory dynamically: metadata.shared below
    return {
        **metrics, "shared_bytes": compiled.metadata.shared, **ptx_instructions(compiled.asm["ptx"]),
        "compile_s": round(time.perf_counter() - start, 1), "error": None,
    }


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _demangle(names: Sequence[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {name: name for name in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


ELEMENT_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def _cuda_name(demangled: str) -> tuple[str, str, str]:
    """(kernel, config, element type) from ``void ns::kernel<T, Cfg<...>, ...>(Params)``: the template arguments
    are the config, with namespaces dropped and element types shortened; no template arguments: ("-", "any")."""
    text = demangled.replace("(anonymous namespace)::", "").removeprefix("void ").strip()
    cut = min(i for i in (text.find("<"), text.find("("), len(text)) if i >= 0)
    base = text[:cut].split("::")[-1]
    if cut == len(text) or text[cut] != "<":
        return base, "-", "any"
    depth, end = 0, cut
    for end in range(cut, len(text)):
        depth += {"<": 1, ">": -1}.get(text[end], 0)
        if depth == 0:
            break
    args = re.sub(r"\b\w+::", "", text[cut + 1:end])
    for long, short in ELEMENT_TYPES.items():
        args = re.sub(rf"\b{long}\b", short, args)
    first = args.split(",", 1)[0].strip()
    return base, " ".join(args.split()), first if first in ELEMENT_TYPES.values() else "any"


def compile_cuda_file(path: str, arch: str) -> list[dict[str, Any]]:
    """nvcc for one arch with ptxas's report; one record per kernel instantiation, the PTX kept for the MMA and
    copy counts."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        command = [nvcc, *NVCC_FLAGS, f"-arch={arch}", "--resource-usage", "-keep", "-keep-dir", tmp, "-c", path,
                   "-o", str(Path(tmp) / "kernel.o")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return [{"kernel": Path(path).name, "config": "-", "dtype": "any", "error": result.stderr[-600:]}]
        ptx = "\n".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
    bodies = dict(_ptx_entries(ptx))
    entries = parse_ptxas(result.stdout + result.stderr)
    names = _demangle(list(entries))
    records = []
    for mangled, metrics in entries.items():
        kernel, config, element = _cuda_name(names[mangled])
        counts = ptx_instructions(bodies.get(mangled, ""))
        dtype = element
        if element == "fp32":
            dtype = "tf32" if counts["mma"] != "none" else "ieee"
        threads = re.search(r"\.maxntid\s+(\d+)", bodies.get(mangled, ""))
        shared = metrics.pop("static_shared")
        records.append({
            "kernel": kernel, "config": config, "dtype": dtype, "file": str(Path(path).relative_to(CSRC.parent)),
            "threads": int(threads.group(1)) if threads else None, **metrics, "shared_bytes": shared, **counts,
            "error": None,
        })
    return records


def _ptx_entries(ptx: str) -> Iterator[tuple[str, str]]:
    """(name, text) of each ``.entry`` in a PTX module, its text running to the next entry."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx)]
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(ptx), "")]):
        yield name, ptx[start:end]


# ---------------------------------------------------------------------------------------------------------------
# Parent side: plan, cache, compile in a pool, assemble records, gates.
# ---------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ff_kernels" / "inspect"


class Cache:
    """Compile results as JSON files named by their key; ``None`` disables it."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Any:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: Any) -> None:
        if self.directory is not None:
            path = self.directory / f"{key}.json"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(value))
            tmp.replace(path)


@functools.lru_cache(maxsize=1)
def _nvcc_version() -> str:
    nvcc = _nvcc()
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip() if nvcc else ""


def _cuda_cache_key(path: Path, arch: str) -> str:
    """nvcc's version, the flags, the arch and the sources it may include: the CUDA files and headers of its folder
    and the headers at the top of csrc/."""
    digest = hashlib.sha256(f"inspect-v{RECORD_VERSION}|{arch}|{' '.join(NVCC_FLAGS)}|{path.name}".encode())
    digest.update(_nvcc_version().encode())
    folder = [p for p in path.parent.rglob("*") if p.suffix in (".cu", ".cuh", ".h")]
    for source in sorted({*folder, *CSRC.glob("*.h")}):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


@dataclass
class Report:
    """The kernel records, the launch records, the failed gates and notes (what was skipped and why)."""

    kernels: list[dict] = field(default_factory=list)
    launches: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _step_specs(selection: Selection) -> list[StepSpec | HeadSpec | ConvSpec]:
    """The linear steps of the selection, the heads (which fuse no optimizer) when "none" is selected, and the conv
    layers."""
    heads = [HeadSpec(p, "none", b, c, k, height, width) for p, (b, c, height, width, k) in
             product(selection.precisions, HEAD_SHAPES)] if "none" in selection.optimizers else []
    convs = [ConvSpec(p, o, b, c_in * k * k, c, c_in, size, k) for p, o, (b, c_in, c, size, k) in
             product(selection.precisions, selection.optimizers, selection.conv_layers)]
    return [StepSpec(p, o, r, k, n) for p, o, r, (k, n) in
            product(selection.precisions, selection.optimizers, selection.rows, selection.layers)] + heads + convs


def _joined(values: Sequence[str], everything: Sequence[str]) -> str:
    """One value, ``any`` when a binary serves every selected one (and more than one), else ``a+b``."""
    if len(values) > 1 and set(values) >= set(everything):
        return "any"
    return "+".join(values)


def _with_occupancy(record: dict, arch: str) -> dict:
    """The arch's shared-memory limit and, for Triton binaries, the theoretical occupancy. CUDA kernels size their
    dynamic shared memory at launch, which ptxas cannot see, so none is claimed for them."""
    limits = ARCHS[arch]
    record["shared_limit"] = limits.shared_per_block
    if record.get("error") or record["source"] == "cuda":
        record.update(blocks_per_sm=None, occupancy=None, occupancy_limiter=None)
        return record
    warps = record["num_warps"]
    blocks, limiter = occupancy(arch, record["registers"], record["shared_bytes"], warps)
    record.update(blocks_per_sm=blocks, occupancy=round(blocks * warps * 32 / limits.threads, 3),
                  occupancy_limiter=limiter)
    return record


def run_inspect(selection: Selection = Selection(), *, jobs: int = 2, cache_dir: Path | None = None,
                progress: bool = True) -> Report:
    """Plan, compile what the cache lacks in a pool of ``jobs`` fresh processes, assemble the report."""
    from tqdm import tqdm

    report = Report()
    cache = Cache(cache_dir)
    cuda_files: dict[tuple[str, str], list[dict]] = {}
    metrics: dict[str, dict] = {}
    binaries: dict[str, dict] = {}
    launches: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ff-kernels-triton-") as triton_cache, ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
        initargs=(triton_cache,),
    ) as pool:
        pending: dict[Future, tuple[dict, Any, str]] = {}  # future -> (where its result goes, key, cache key)
        if "cuda" in selection.sources:
            sources = sorted(CSRC.rglob("*.cu"))
            if not sources:
                report.notes.append(f"CUDA kernels skipped: no .cu files under {CSRC} (a source checkout has them)")
            elif _nvcc() is None:
                report.notes.append("CUDA kernels skipped: nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
            for path, arch in product(sources if _nvcc() else (), selection.archs):
                key = _cuda_cache_key(path, arch)
                if (cached := cache.get(key)) is not None:
                    cuda_files[(str(path), arch)] = cached
                else:
                    pending[pool.submit(compile_cuda_file, str(path), arch)] = (cuda_files, (str(path), arch), key)
        if "triton" in selection.sources:
            binaries, launches = pool.submit(_plan_job, _step_specs(selection), selection).result()
        for key, entry in binaries.items():
            if (cached := cache.get(key)) is not None:
                metrics[key] = cached
            else:
                pending[pool.submit(_compile_triton, entry["job"])] = (metrics, key, key)
        with tqdm(total=len(pending), desc="compiling", unit="binary", disable=not progress or not pending) as bar:
            for future in as_completed(pending):
                results, key, cache_key = pending[future]
                results[key] = future.result()
                if _succeeded(results[key]):
                    cache.put(cache_key, results[key])
                bar.update()

    report.kernels = _triton_records(binaries, metrics, selection) + _cuda_records(cuda_files, selection)
    by_key = {r["key"]: r for r in report.kernels if "key" in r}
    report.launches = _launch_records(launches, by_key, selection)
    report.failures = gate_failures(report.kernels, report.launches)
    return report


def _succeeded(result: dict | list[dict]) -> bool:
    """Only successes are cached: a transient failure (a killed compiler) must not stick."""
    return not any(r["error"] for r in (result if isinstance(result, list) else [result]))


def _triton_records(binaries: dict[str, dict], metrics: dict[str, dict], selection: Selection) -> list[dict]:
    records = []
    for key, entry in binaries.items():
        record = {
            "source": "triton", "kernel": entry["kernel"], "config": entry["config"],
            "dtype": _joined(entry["dtypes"], selection.precisions), "dtypes": entry["dtypes"],
            "optimizer": _joined(entry["optimizers"], selection.optimizers), "optimizers": entry["optimizers"],
            "layers": entry["layers"], "rows": entry["rows"], "arch": entry["arch"],
            "num_warps": entry["num_warps"], "num_stages": entry["num_stages"],
            "threads": 32 * entry["num_warps"], **metrics[key], "key": key,
        }
        records.append(_with_occupancy(record, entry["arch"]))
    return records


def _cuda_records(files: dict[tuple[str, str], list[dict]], selection: Selection) -> list[dict]:
    return [
        _with_occupancy({"source": "cuda", "arch": arch, "optimizer": "any", **record}, arch)
        for (_, arch), records in sorted(files.items())
        for record in records
        if selection.wants_kernel(record["kernel"])
    ]


def _launch_records(launches: list[dict], by_key: dict[str, dict], selection: Selection) -> list[dict]:
    """Launches at each shape with their waves on an H100 (132 SMs at the sm_90 binary's occupancy); launches
    that differ only in precision or optimizer but share binary and programs are merged."""
    merged: dict[tuple, dict] = {}
    for launch in launches:
        key = launch["binaries"].get("sm_90")
        binary = by_key.get(key) if key else None
        blocks = binary["blocks_per_sm"] if binary else None
        group = (launch["kernel"], launch["P"], launch["K"], launch["N"], launch["config"], key, launch["programs"])
        record = merged.setdefault(group, {
            "kernel": launch["kernel"], "shape": f"P=Q={launch['P']} K={launch['K']} N={launch['N']}",
            "P": launch["P"], "Q": launch["Q"], "K": launch["K"], "N": launch["N"], "config": launch["config"],
            "dtypes": [], "optimizers": [], "programs": launch["programs"], "sms": H100_SMS,
            "blocks_per_sm": blocks, "waves": round(launch["programs"] / (H100_SMS * blocks), 3) if blocks else None,
            "planned_blocks_per_sm": launch.get("planned_blocks_per_sm"),
        })
        for name, value in (("dtypes", launch["dtype"]), ("optimizers", launch["optimizer"])):
            if value not in record[name]:
                record[name].append(value)
    records = list(merged.values())
    for record in records:
        record["dtype"] = _joined(record["dtypes"], selection.precisions)
        record["optimizer"] = _joined(record["optimizers"], selection.optimizers)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Gates
# ---------------------------------------------------------------------------------------------------------------
GATES = {
    "compiles": "every binary compiles",
    "spills": "0 spill bytes (stores and loads) in every kernel",
    "shared": "shared memory within the arch's opt-in limit per block",
    "tensor cores": "bf16/fp16/tf32 GEMMs on tensor cores: wgmma on sm_90 (Triton), mma.sync on sm_80",
    "async copies": "cp.async or TMA in the 500-wide GEMM variants (K or N not a multiple of 16)",
    "waves": "at least one wave on 132 SMs for both GEMMs at every shape with P = Q >= 4096",
    "planner": "GEMM 2's row split plans its wave with at least the resident blocks per SM measured on sm_90",
}
TENSOR_CORE_DTYPES = ("bf16", "fp16", "tf32")


def _subject(record: dict) -> str:
    where = ""
    if record.get("layers"):
        where = f" [{','.join(record['layers'])}; P=Q {','.join(map(str, record['rows']))}]"
    elif record.get("file"):
        where = f" [{record['file']}]"
    return (f"{record['source']} {record['kernel']} {record['optimizer']} {record['dtype']} {record['arch']} "
            f"{record['config']}{where}")


def gate_failures(kernels: Iterable[dict], launches: Iterable[dict]) -> list[str]:
    """``"gate: subject: detail"`` for every failed gate. A GEMM is a kernel with an MMA instruction in any of its
    binaries (so the per-row kernels and reductions are exempt from the tensor-core and wave gates)."""
    kernels, launches = list(kernels), list(launches)
    gemms = {(r["source"], r["kernel"]) for r in kernels if r.get("mma", "none") != "none"}
    failures = []
    for r in kernels:
        subject = _subject(r)
        if r.get("error"):
            failures.append(f"compiles: {subject}: {r['error']}")
            continue
        if r["spill_bytes"] or r["spill_loads"]:
            failures.append(f"spills: {subject}: {r['spill_bytes']} B stores, {r['spill_loads']} B loads "
                            f"({r['registers']} registers)")
        if r["shared_bytes"] > r["shared_limit"]:
            failures.append(f"shared: {subject}: {r['shared_bytes']} B > {r['shared_limit']} B")
        if (r["source"], r["kernel"]) not in gemms or r["dtype"] not in TENSOR_CORE_DTYPES:
            continue
        wanted = "wgmma" if r["arch"] == "sm_90" and r["source"] == "triton" else None
        if (wanted and r["mma"] != wanted) or r["mma"] == "none":
            failures.append(f"tensor cores: {subject}: {r['mma']}, wanted {wanted or 'mma.sync or wgmma'}")
        narrow = [layer for layer in r.get("layers", ()) if any(int(d) % 16 for d in layer.split("x"))]
        if narrow and r["source"] == "triton" and not (r["async_copies"] or r["tma"]):
            failures.append(f"async copies: {subject}: no cp.async or TMA ({','.join(narrow)})")
    gemm_names = {name for source, name in gemms if source == "triton"}
    for launch in launches:
        if launch["kernel"] in gemm_names and launch["P"] >= 4096 and (launch["waves"] or 0) < 1:
            failures.append(f"waves: {launch['kernel']} {launch['optimizer']} {launch['dtype']} {launch['config']} "
                            f"{launch['shape']}: {launch['programs']} programs, {launch['blocks_per_sm']} per SM, "
                            f"{launch['waves']} waves")
        planned = launch.get("planned_blocks_per_sm")
        if planned is not None and (launch["blocks_per_sm"] or 0) > planned:
            failures.append(f"planner: {launch['kernel']} {launch['optimizer']} {launch['dtype']} {launch['config']} "
                            f"{launch['shape']}: {launch['blocks_per_sm']} blocks per SM measured, {planned} planned")
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def _span(values: Sequence[Any], fmt: str = "{}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def _groups(records: Iterable[dict], *fields: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[f] for f in fields), []).append(record)
    return groups


def format_summary(report: Report) -> str:
    """Worst case per kernel, optimizer, precision and arch over configs and shapes; waves per kernel and shape;
    gate failures counted per gate."""
    lines = ["Binaries: worst over configs and shapes (spill = bytes stored per thread; smem KB of the limit; "
             "cp.async and TMA: fewest per binary; blocks/SM: lowest theoretical occupancy)",
             f"{'source':<7}{'kernel':<24}{'opt':<6}{'dtype':<6}{'arch':<7}{'bins':>5}{'regs':>6}{'spill':>7}"
             f"{'smem KB':>14}{'mma':>10}{'cp.async':>9}{'tma':>5}{'blk/SM':>7}{'errors':>7}"]
    for (source, kernel, opt, dtype, arch), group in _groups(
            report.kernels, "source", "kernel", "optimizer", "dtype", "arch").items():
        ok = [r for r in group if not r.get("error")]
        shared = f"{max((r['shared_bytes'] for r in ok), default=0) / 1024:.1f}/{ARCHS[arch].shared_per_block // 1024}"
        mmas = "/".join(sorted({r["mma"] for r in ok})) or "-"
        blocks = [r["blocks_per_sm"] for r in ok if r["blocks_per_sm"] is not None]
        lines.append(
            f"{source:<7}{kernel[:23]:<24}{opt:<6}{dtype:<6}{arch:<7}{len(group):>5}"
            f"{max((r['registers'] for r in ok), default=0):>6}{max((r['spill_bytes'] for r in ok), default=0):>7}"
            f"{shared:>14}{mmas:>10}{min((r['async_copies'] for r in ok), default=0):>9}"
            f"{max((r['tma'] for r in ok), default=0):>5}{min(blocks) if blocks else '-':>7}{len(group) - len(ok):>7}"
        )
    if report.launches:
        lines += ["", f"Waves = programs / ({H100_SMS} SMs x resident blocks per SM of the sm_90 binary), H100; "
                  "range over configs, precisions and optimizers",
                  f"{'kernel':<24}{'shape':<28}{'programs':>14}{'waves':>16}"]
        for (kernel, shape), group in _groups(report.launches, "kernel", "shape").items():
            lines.append(f"{kernel[:23]:<24}{shape:<28}{_span([r['programs'] for r in group]):>14}"
                         f"{_span([r['waves'] for r in group], '{:.2f}'):>16}")
    lines += ["", "Gates (DESIGN 10, issue 10):"]
    for gate, description in GATES.items():
        count = sum(f.startswith(f"{gate}:") for f in report.failures)
        lines.append(f"  {'PASS' if count == 0 else 'FAIL':<5}{gate:<14}{description}"
                     + (f": {count} failing" if count else ""))
    cuda = [] if all(r["source"] != "cuda" for r in report.kernels) else [
        "CUDA: shared memory is the static part (the kernels size the rest at launch, unseen by ptxas), so no "
        "occupancy or waves are claimed for them"]
    lines += [f"note: {note}" for note in [*cuda, *report.notes]]
    return "\n".join(lines)


def format_records(report: Report) -> str:
    """Every binary on one line, then every failed gate."""
    lines = [f"{'source':<7}{'kernel':<24}{'opt':<6}{'dtype':<6}{'arch':<7}{'regs':>5}{'spill st/ld':>13}"
             f"{'smem':>8}{'mma':>10}{'cp.async':>9}{'tma':>5}{'blk/SM':>7}  {'limiter':<10}config [shapes]"]
    for r in report.kernels:
        if r.get("error"):
            lines.append(f"{r['source']:<7}{r['kernel'][:23]:<24}{r['optimizer']:<6}{r['dtype']:<6}{r['arch']:<7}"
                         f"  error: {r['error'][:200]}")
            continue
        where = f"[{','.join(r['layers'])}; P=Q {','.join(map(str, r['rows']))}]" if r.get("layers") else r["file"]
        blocks = "-" if r["blocks_per_sm"] is None else r["blocks_per_sm"]
        spills = f"{r['spill_bytes']}/{r['spill_loads']}"
        lines.append(
            f"{r['source']:<7}{r['kernel'][:23]:<24}{r['optimizer']:<6}{r['dtype']:<6}{r['arch']:<7}"
            f"{r['registers']:>5}{spills:>13}{r['shared_bytes']:>8}{r['mma']:>10}"
            f"{r['async_copies']:>9}{r['tma']:>5}{blocks:>7}  {r['occupancy_limiter'] or '-':<10}{r['config']} {where}"
        )
    lines += ["", f"Failed gates ({len(report.failures)}):", *(f"  {f}" for f in report.failures)]
    return "\n".join(lines)


def write_json(report: Report, path: Path) -> None:
    kernels = [{k: v for k, v in r.items() if k != "key"} for r in report.kernels]
    payload = {"kernels": kernels, "launches": report.launches, "failures": report.failures, "notes": report.notes,
               "gates": GATES, "environment": _environment()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def _environment() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    nvcc = _nvcc_version().splitlines()
    return {"triton": triton_version, "torch": torch.__version__, "nvcc": nvcc[-1] if nvcc else None,
            "command": " ".join(["ff-kernels", *sys.argv[1:]]) if sys.argv else "",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _names(choices: Sequence[str]):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}; got {text!r}")
        return values

    return parse


def _ints(minimum: int):
    """argparse type: comma-separated integers, each at least ``minimum``."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}; got {text!r}")
        return values

    return parse


def _layers(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(kn_pair(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected K x N pairs, e.g. 784x500,2000x2000; got {text!r}") from err


def _writable(path: Path | None, flag: str) -> None:
    """Fail before the compiling, not after it: the output file must be one this process can create or replace (a
    trial open, undone if it created the file)."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be written ({err.strerror or err})") from err
    if not existed:
        path.unlink()


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    """Register ``ff-kernels inspect``."""
    parser = subcommands.add_parser(
        "inspect", help="compile every GPU kernel ahead of time (no GPU needed) and check registers, spills, "
        "shared memory, MMA instructions, occupancy and waves", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    parser.add_argument("--text", type=Path, default=None, help="write the summary and every record to this file")
    parser.add_argument("--gates", action="store_true", help="exit with status 1 when a gate fails, listing them")
    parser.add_argument("--subset", choices=tuple(SUBSETS), default=None,
                        help="a preset selection (ci: both GEMMs and the row kernel, bf16, Adam, sm_90, config 0, "
                        "784x500 at P=Q=4096); each other filter given replaces that field of the preset")
    parser.add_argument("--kernel", type=lambda t: tuple(v for v in t.split(",") if v), default=None,
                        help="kernel name substrings, e.g. forward,grad")
    parser.add_argument("--arch", type=_names(tuple(ARCHS)), default=None)
    parser.add_argument("--dtype", type=_names(PRECISIONS), default=None, help="bf16,fp16,tf32,ieee")
    parser.add_argument("--optimizer", type=_names(OPTIMIZERS), default=None, help="none,sgd,adam")
    parser.add_argument("--rows", type=_ints(1), default=None, help="P = Q values (default DESIGN 4's 512,4096,25000)")
    parser.add_argument("--kn", type=_layers, default=None, help="K x N layers (default DESIGN 4's four)")
    parser.add_argument("--config", type=_ints(0), default=None,
                        help="positions in each launch's autotune candidates, after its pruning (default all)")
    parser.add_argument("--source", type=_names(("triton", "cuda")), default=None, help="triton,cuda")
    parser.add_argument("--jobs", type=positive_int, default=2, help="compile processes (default 2)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="compile cache folder")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--verbose", action="store_true", help="also print every binary and every failed gate")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _writable(args.json, "--json")
    _writable(args.text, "--text")
    selection = SUBSETS[args.subset] if args.subset else Selection()
    overrides = {"kernels": args.kernel, "archs": args.arch, "precisions": args.dtype, "optimizers": args.optimizer,
                 "rows": args.rows, "layers": args.kn, "configs": args.config, "sources": args.source}
    selection = replace(selection, **{k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    report = run_inspect(selection, jobs=args.jobs, cache_dir=None if args.no_cache else args.cache_dir,
                         progress=not args.no_progress)
    if not report.kernels:  # a gate over nothing proves nothing
        report.failures.append("selection: no binary matches these filters (see --help for the names)")
    summary = format_summary(report)
    print(summary)
    if args.verbose:
        print("\n" + format_records(report))
    elif args.gates and report.failures:
        print("\nFailed gates:\n" + "\n".join(f"  {f}" for f in report.failures))
    print(f"\n{len(report.kernels)} binaries, {len(report.launches)} launches in {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.text:
        args.text.parent.mkdir(parents=True, exist_ok=True)
        args.text.write_text(summary + "\n\n" + format_records(report) + "\n")
        print(f"wrote {args.text}")
    return 1 if args.gates and report.failures else 0
