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

from ff_kernels.inspect.arch import ARCHS, H100_SMS, Arch, occupancy
from ff_kernels.inspect.cache import RECORD_VERSION, Cache, default_cache_dir
from ff_kernels.inspect.cli import add_parser, run
from ff_kernels.inspect.cuda import CSRC, NVCC_FLAGS, _cuda_name, _nvcc, compile_cuda_file
from ff_kernels.inspect.gates import GATES, gate_failures
from ff_kernels.inspect.output import format_records, format_summary, write_json
from ff_kernels.inspect.ptx import parse_ptxas, ptx_instructions
from ff_kernels.inspect.report import Report, run_inspect
from ff_kernels.inspect.targets import (
    CONV_SHAPES,
    HEAD_SHAPES,
    OPTIMIZERS,
    PRECISION_DTYPES,
    PRECISIONS,
    SUBSETS,
    ConvSpec,
    HeadSpec,
    Selection,
    StepSpec,
    TritonJob,
    _step_specs,
)

__all__ = [
    "ARCHS",
    "CONV_SHAPES",
    "CSRC",
    "GATES",
    "H100_SMS",
    "HEAD_SHAPES",
    "NVCC_FLAGS",
    "OPTIMIZERS",
    "PRECISIONS",
    "PRECISION_DTYPES",
    "RECORD_VERSION",
    "SUBSETS",
    "Arch",
    "Cache",
    "ConvSpec",
    "HeadSpec",
    "Report",
    "Selection",
    "StepSpec",
    "TritonJob",
    "_cuda_name",
    "_nvcc",
    "_step_specs",
    "add_parser",
    "compile_cuda_file",
    "default_cache_dir",
    "format_records",
    "format_summary",
    "gate_failures",
    "occupancy",
    "parse_ptxas",
    "ptx_instructions",
    "run",
    "run_inspect",
    "write_json",
]
