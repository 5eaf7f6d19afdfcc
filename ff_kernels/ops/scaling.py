"""How every backend forms GEMM 2's operands so that low-precision gradients hold at every shape.

grad_weight = sum_i c_i r_i h_i^T x_i (DESIGN 1.6). At real shapes c_i is tiny (|c_i| <= 2 kappa / (P+Q), about
5e-7 for a 500-unit layer at P = Q = 4096) and r_i is about 1/||x_i||, so the product c_i r_i h_ij underflows
fp16 (smallest subnormal 6e-8) and the gradient comes out as zeros; and where a row of x is nearly zero, r_i
reaches 1/eps while h_ij can be large (a big bias), so c_i r_i h_ij can overflow. Every backend therefore uses

    A_i = (c_i / 2^s) * h_i        B_i = r_i * x_i        grad_weight = 2^s * (A^T B)    (fp32 accumulation)

with 2^s the power of two >= the analytic bound on |c_i| (:func:`coefficient_scale`): |A_ij| <= |h_ij| and
|B_ik| <= 1, so neither operand can overflow, neither is pushed towards the subnormal range by the batch size,
and dividing and multiplying by 2^s is exact. grad_bias = 2^s * (A^T 1) likewise.
"""

from __future__ import annotations

import math

import torch

from ff_kernels._options import ClassStepOptions, StepOptions


def coefficient_scale(opts: StepOptions, rows_pos: int, rows_neg: int) -> float:
    """A power of two >= max |c_i|: |c_i| <= 2 kappa / (P+Q) for the logistic loss, 2 kappa |alpha| / P for SymBa.

    Computed on the host from the shapes and options alone, so it costs no device synchronisation.
    """
    rows = rows_pos if opts.loss == "symba" else rows_pos + rows_neg
    bound = 2.0 * opts.kappa * (abs(opts.alpha) if opts.loss == "symba" else 1.0) / max(rows, 1)
    return power_of_two_above(bound)


def class_coefficient_scale(opts: ClassStepOptions, rows: int) -> float:
    """A power of two >= max |c_bk| for the class-goodness loss (DESIGN 7): |softmax - one-hot| <= 1, so
    |c_bk| <= 2 kappa / (B tau). The same operand rule then holds for convolutions: GEMM 2 (the weight gradient)
    reads (c / 2^s) h and r x, and 2^s is undone in fp32."""
    return power_of_two_above(2.0 * opts.kappa / (max(rows, 1) * opts.temperature))


def power_of_two_above(bound: float) -> float:
    """The power of two in (bound, 2 bound] (1 for a bound that is not a positive finite number)."""
    if not bound > 0.0 or not math.isfinite(bound):
        return 1.0
    return math.ldexp(1.0, math.frexp(bound)[1])


def narrow_exponent(dtype: torch.dtype) -> bool:
    """fp16's 5-bit exponent is the only one of our dtypes where c_i r_i h_ij leaves the representable range."""
    return torch.finfo(dtype).max < 1e10
