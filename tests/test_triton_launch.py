"""How the Triton path launches, checked without a GPU: the device every launch runs on, grids that fit CUDA's
limits at any batch size, the autotuner's key and its restore hooks, and input checks that survive ``python -O``.

The kernels themselves are tested against the reference in test_triton.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

from ff_kernels import backends, optim
from ff_kernels._options import check_step_options
from ff_kernels.ops.triton import common, forward_gemm, grad_update_gemm, ops, row_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRID_X_MAX = 2**31 - 1  # CUDA's limit on gridDim.x; y and z stop at 65535
GRID_YZ_MAX = 65535


def _inputs(rows_pos=9, rows_neg=7, k=11, n=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_pos, x_neg = torch.rand(rows_pos, k, generator=gen), torch.rand(rows_neg, k, generator=gen)
    w, b = torch.randn(n, k, generator=gen) * k**-0.5, torch.randn(n, generator=gen) * 0.1
    return [t.to(DEVICE, dtype) for t in (x_pos, x_neg, w, b)]


def _options(n, loss="logistic"):
    return check_step_options(
        threshold=2.0, goodness="mean", loss=loss, normalize="l2", eps=1e-4, alpha=4.0, out_features=n
    )


# ---------------------------------------------------------------------------------------------------------------
# Device guard: Triton launches on the current CUDA device, so every launch must run with the weight's device
# current (tensors on cuda:1 while cuda:0 is current). Checked by recording torch.cuda.device_of.
# ---------------------------------------------------------------------------------------------------------------
class _LaunchProbe:
    """Stands in for a kernel: records which tensor's device was current at each launch, then launches."""

    def __init__(self, kernel, name, current, launches):
        self._kernel, self._name, self._current, self._launches = kernel, name, current, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._launches.append((self._name, self._current[-1] if self._current else None))
            return self._kernel[grid](*args, **kwargs)

        return launch

    def __getattr__(self, name):
        return getattr(self._kernel, name)


def _run_path(path, x_pos, x_neg, w, b):
    opts = _options(w.shape[0])
    if path == "forward":
        ops.ff_linear_forward_triton(x_pos, w, b, kappa=opts.kappa, normalize="l2", eps=1e-4)
    elif path == "step":
        ops.ff_linear_step_triton(x_pos, x_neg, w, b, opts)
    elif path == "sgd":
        ops.ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=optim.SGD([w, b], lr=0.1, momentum=0.9))
    else:
        ops.ff_linear_step_triton(x_pos, x_neg, w, b, opts, optimizer=optim.Adam([w, b], lr=1e-2))


def _probe_launches(monkeypatch, current, launches):
    for module, name in (
        (forward_gemm, "ff_forward_kernel"),
        (row_loss, "ff_row_kernel"),
        (grad_update_gemm, "ff_grad_update_kernel"),
    ):
        monkeypatch.setattr(module, name, _LaunchProbe(getattr(module, name), name, current, launches))


@pytest.mark.parametrize("path", ["step", "sgd", "adam"])
def test_every_step_launch_runs_on_the_weight_device(path, monkeypatch):
    """The step enters the weight's device (``torch.cuda._exchange_device``, ``device_of``'s own call) around all
    three launches and restores the previous one; the guard is forced on, as for CUDA tensors."""
    current, launches, restored = [], [], []

    def exchange(index):
        current.append(index)
        return -7  # the previously current device, handed back on exit

    def restore(previous):
        restored.append(previous)
        current.pop()

    monkeypatch.setattr(ops, "_guards_device", lambda w: True)
    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", restore)
    _probe_launches(monkeypatch, current, launches)
    x_pos, x_neg, w, b = _inputs()
    _run_path(path, x_pos, x_neg, w, b)
    assert [name for name, _ in launches] == ["ff_forward_kernel", "ff_row_kernel", "ff_grad_update_kernel"]
    assert all(index == w.get_device() for _, index in launches), launches
    assert restored == [-7] and current == []


@pytest.mark.parametrize("path,kernels", [("forward", 2)])
def test_every_launch_runs_on_the_weight_device(path, kernels, monkeypatch):
    current, launches = [], []
    real_device_of = torch.cuda.device_of

    class RecordingDeviceOf:
        def __init__(self, obj):
            self.obj, self.inner = obj, real_device_of(obj)

        def __enter__(self):
            current.append(self.obj)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            current.pop()
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(torch.cuda, "device_of", RecordingDeviceOf)
    _probe_launches(monkeypatch, current, launches)
    x_pos, x_neg, w, b = _inputs()
    _run_path(path, x_pos, x_neg, w, b)
    assert len(launches) == kernels, launches
    for name, tensor in launches:
        assert tensor is not None, f"{name} launched without entering the weight's device"
        assert tensor.device == w.device and tensor.data_ptr() == w.data_ptr(), name


# ---------------------------------------------------------------------------------------------------------------
# Grids: every launch fits CUDA's limits at any batch size (GEMM 1 used to put the row tiles on axis 1, which
# stops at 65535 tiles: about 4 million rows at BLOCK_M = 64).
# ---------------------------------------------------------------------------------------------------------------
def _assert_fits_cuda(grid):
    assert 1 <= len(grid) <= 3, grid
    assert all(isinstance(g, int) and g >= 1 for g in grid), grid
    assert grid[0] <= GRID_X_MAX and all(g <= GRID_YZ_MAX for g in grid[1:]), grid


def _product(grid):
    total = 1
    for g in grid:
        total *= g
    return total


def _blocks(configs):
    """Each config's block sizes, and the smallest block the kernels accept, the worst case for the grid."""
    return [c.kwargs for c in configs] + [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}]


@pytest.mark.parametrize("rows_pos,rows_neg", [(5 * 10**6, 5 * 10**6), (10**7, 0), (0, 10**7), (3, 10**7 - 3)])
@pytest.mark.parametrize("n", [1, 500, 4096])
def test_forward_grid_fits_cuda_limits_at_ten_million_rows(rows_pos, rows_neg, n):
    for meta in _blocks(common.FORWARD_CONFIGS):
        grid = forward_gemm.forward_grid(rows_pos, rows_neg, n, meta)
        _assert_fits_cuda(grid)
        tiles_m = -(-rows_pos // meta["BLOCK_M"]) + -(-rows_neg // meta["BLOCK_M"])
        assert _product(grid) == tiles_m * -(-n // meta["BLOCK_N"]), (meta, grid)


@pytest.mark.parametrize("n,k", [(1, 1), (500, 784), (4096, 4096), (10**5, 10**5)])
def test_grad_grid_fits_cuda_limits(n, k):
    """GEMM 2's grid covers the weight's tiles only (it loops over the rows), so M never enters it; N of 10^5 with
    the smallest blocks would still overflow a second axis."""
    for meta in _blocks(common.GRAD_CONFIGS):
        grid = grad_update_gemm.grad_grid(n, k, meta)
        _assert_fits_cuda(grid)
        assert _product(grid) == -(-n // meta["BLOCK_N"]) * -(-k // meta["BLOCK_K"]), (meta, grid)


@pytest.mark.parametrize("rows", [1, 1000, 10**7, 10**9])
def test_row_grid_fits_cuda_limits(rows):
    block, grid = row_loss.row_launch(rows)
    _assert_fits_cuda(grid)
    assert grid[0] * block >= rows and (grid[0] - 1) * block < rows


# ---------------------------------------------------------------------------------------------------------------
# Autotune key: the rows bucketed to a power of two (so every batch size does not re-tune) and the input precision
# (TF32 and IEEE fp32 products want different tiles); the autotuner adds the dtypes itself.
# ---------------------------------------------------------------------------------------------------------------
def _tuning_key(kernel, rows, n, k, dtype):
    """The tuple the autotuner builds from its key names (before the dtypes it appends)."""
    bucket, precision = common.tuning_args(rows, dtype)
    values = {"M_BUCKET": bucket, "N": n, "K": k, "INPUT_PRECISION": precision}
    return tuple(values[name] for name in kernel.keys)


@pytest.mark.parametrize("kernel", ["forward", "grad_update"])
def test_autotune_key_buckets_rows_and_holds_input_precision(kernel, monkeypatch):
    kernel = forward_gemm.ff_forward_kernel if kernel == "forward" else grad_update_gemm.ff_grad_update_kernel
    assert set(kernel.keys) == {"M_BUCKET", "N", "K", "INPUT_PRECISION"}
    assert set(kernel.keys) <= set(kernel.arg_names)
    monkeypatch.setattr(common, "tf32_allowed", lambda: False)
    ieee = _tuning_key(kernel, 1000, 500, 784, torch.float32)
    for rows in (513, 1020, 1024):
        assert _tuning_key(kernel, rows, 500, 784, torch.float32) == ieee, rows
    assert ieee != _tuning_key(kernel, 1025, 500, 784, torch.float32)
    assert ieee != _tuning_key(kernel, 1000, 500, 785, torch.float32)
    monkeypatch.setattr(common, "tf32_allowed", lambda: True)
    tf32 = _tuning_key(kernel, 1000, 500, 784, torch.float32)
    assert tf32 != ieee and tf32 == _tuning_key(kernel, 1020, 500, 784, torch.float32)
    assert common.tuning_args(0, torch.bfloat16)[0] == common.tuning_args(1, torch.bfloat16)[0] == 1


# ---------------------------------------------------------------------------------------------------------------
# Autotuner hooks: GEMM 2 updates the weight and optimizer state in place, so each benchmarked config must be
# undone; the optional pointers (bias, momentum or Adam state) are None for plain steps, SGD, no-bias layers.
# triton 3.0-3.7's restore_value clones them unconditionally (AttributeError on None); 3.0/3.1 pass the hooks the
# positional arguments, 3.2 and later a dict of all arguments by name.
# ---------------------------------------------------------------------------------------------------------------
def _grad_kernel_args(**tensors):
    names = grad_update_gemm.ff_grad_update_kernel.arg_names
    named = {name: tensors.get(name, 0) for name in names if not name.startswith("BLOCK_")}
    return named


@pytest.mark.parametrize("form", ["named", "positional"])
def test_autotune_restore_hooks_skip_missing_pointers(form):
    w, s1w, s2w = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 4)
    saved = (w.clone(), s1w.clone(), s2w.clone())
    named = _grad_kernel_args(w_ptr=w, b_ptr=None, s1w_ptr=s1w, s2w_ptr=s2w, s1b_ptr=None, s2b_ptr=None)
    args = named if form == "named" else tuple(named.values())
    hooks = grad_update_gemm.GRAD_RESTORE
    hooks.save(args)
    for t in (w, s1w, s2w):
        t.add_(1.0)
    hooks.restore(args, exception=None)
    for t, before in zip((w, s1w, s2w), saved):
        assert torch.equal(t, before)
    hooks.save(args, reset_only=True)  # the autotuner's reset-only call after tuning: nothing to reset, no copies
    w.add_(1.0)
    hooks.restore(args, exception=None)
    assert torch.equal(w, saved[0] + 1.0)
    # an SGD step without momentum and bias: no state at all
    plain = _grad_kernel_args(w_ptr=w, b_ptr=None, s1w_ptr=None, s2w_ptr=None, s1b_ptr=None, s2b_ptr=None)
    hooks.save(plain if form == "named" else tuple(plain.values()))
    hooks.restore(plain if form == "named" else tuple(plain.values()), exception=RuntimeError("config failed"))


def test_autotuning_the_fused_update_applies_it_once(monkeypatch):
    """Triton's own autotuner benchmarks two configs of the in-place SGD step of a layer without bias (bias and
    state pointers None), with a stub timer that runs each config once: the hooks undo both trial runs, so the
    weight and momentum equal one untuned step; the second step reuses the tuned config."""
    kernel = grad_update_gemm.ff_grad_update_kernel
    runs = []

    def bench(kernel_call, quantiles):
        kernel_call()
        runs.append(1)
        return [float(len(runs))] * len(quantiles)

    blocks = ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})
    hooks = grad_update_gemm.GRAD_RESTORE
    try:
        tuned = triton.autotune(
            [triton.Config(b, num_warps=4, num_stages=1) for b in blocks],
            key=list(kernel.keys),
            pre_hook=hooks.save,
            post_hook=hooks.restore,
            do_bench=bench,
        )(kernel.fn)
    except TypeError:
        pytest.skip("this triton's autotune takes no do_bench")
    x_pos, x_neg, w, _ = _inputs(k=37, n=19)
    opts = _options(w.shape[0])
    w_tuned = w.clone()
    opt, opt_tuned = optim.SGD([w], lr=0.5, momentum=0.9), optim.SGD([w_tuned], lr=0.5, momentum=0.9)
    for step in range(2):
        ops.ff_linear_step_triton(x_pos, x_neg, w, None, opts, optimizer=opt)
        with monkeypatch.context() as patch:
            patch.setattr(grad_update_gemm, "ff_grad_update_kernel", tuned)
            ops.ff_linear_step_triton(x_pos, x_neg, w_tuned, None, opts, optimizer=opt_tuned)
        assert len(runs) == 2, step
        torch.testing.assert_close(w_tuned, w, rtol=1e-6, atol=1e-7)
        buf, buf_tuned = (o.check_holds("weight", p)["momentum_buffer"] for o, p in ((opt, w), (opt_tuned, w_tuned)))
        torch.testing.assert_close(buf_tuned, buf, rtol=1e-6, atol=1e-7)


def test_grad_kernel_uses_none_safe_hooks_not_restore_value():
    kernel = grad_update_gemm.ff_grad_update_kernel
    assert not getattr(kernel, "restore_value", None)
    assert kernel.pre_hook == grad_update_gemm.GRAD_RESTORE.save
    assert kernel.post_hook == grad_update_gemm.GRAD_RESTORE.restore


# ---------------------------------------------------------------------------------------------------------------
# Input checks: explicit exceptions naming the argument (asserts vanish under python -O).
# ---------------------------------------------------------------------------------------------------------------
def test_launcher_rejects_bad_inputs_by_name():
    x_pos, x_neg, w, b = _inputs()
    with pytest.raises(ValueError, match="x_pos"):
        forward_gemm.launch_forward(x_pos.t().contiguous().t(), x_neg, w, b, "l2", 1e-4, store_r=True)
    with pytest.raises(ValueError, match="x_neg"):
        forward_gemm.launch_forward(x_pos, x_neg[:, :-1].contiguous(), w, b, "l2", 1e-4, store_r=True)
    with pytest.raises(ValueError, match="weight"):
        forward_gemm.launch_forward(x_pos, x_neg, w.t().contiguous().t(), b, "l2", 1e-4, store_r=True)
    with pytest.raises(TypeError, match="x_neg"):
        forward_gemm.launch_forward(x_pos, x_neg.double(), w, b, "l2", 1e-4, store_r=True)
    with pytest.raises(ValueError, match="bias"):
        forward_gemm.launch_forward(x_pos, x_neg, w, b[:-1], "l2", 1e-4, store_r=True)


def test_custom_ops_reject_bad_inputs_by_name():
    x_pos, x_neg, w, b = _inputs()
    opts = _options(w.shape[0])
    with pytest.raises(ValueError, match="x_pos"):
        ops.ff_linear_step_triton(x_pos[:, ::2], x_neg, w, b, opts)
    with pytest.raises(ValueError, match="x_pos"):
        ops.ff_linear_step_triton(x_pos, x_neg[:5], w, b, _options(w.shape[0], loss="symba"))
    step_args = (None, None, None, 2.0, opts.kappa, "logistic", "l2", 1e-4, 4.0)
    with pytest.raises(ValueError, match="buf_w"):
        torch.ops.ff_kernels.triton_step_sgd_(
            x_pos, x_neg, w, b, *step_args, None, None, 0.1, 0.9, 0.0, 0.0, False, True, True
        )
    with pytest.raises(TypeError, match="buf_b"):
        buf = torch.zeros_like(w, dtype=torch.float32)
        torch.ops.ff_kernels.triton_step_sgd_(
            x_pos, x_neg, w, b, *step_args, buf, b.half(), 0.1, 0.9, 0.0, 0.0, False, True, True
        )
    with pytest.raises(TypeError, match="x_pos is torch.bfloat16 but weight is torch.float32"):
        ops.ff_linear_step_triton(x_pos.bfloat16(), x_neg.bfloat16(), w, b, opts)
    with pytest.raises(ValueError, match="w_gemm"):
        torch.ops.ff_kernels.triton_step(x_pos.bfloat16(), x_neg.bfloat16(), w, b, w[:-1].bfloat16(), *step_args[1:])
    with pytest.raises(ValueError, match="exp_avg_b"):
        state = (torch.zeros_like(w), torch.zeros_like(w), None, None)
        torch.ops.ff_kernels.triton_step_adam_(
            x_pos, x_neg, w, b, *step_args, *state, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, 1e-2, 1.0, 1e-2, 1.0
        )


def test_input_checks_survive_python_optimize():
    """The same checks in a ``python -O`` interpreter, where an ``assert`` would not run."""
    script = textwrap.dedent(
        """
        import torch
        from ff_kernels.ops.triton import common, forward_gemm, grad_update_gemm, ops, row_loss
        if __debug__:
            raise SystemExit("not running under python -O")
        x_pos, x_neg, w = torch.rand(9, 11), torch.rand(7, 11), torch.randn(5, 11)
        for bad, name in ((x_pos.t().contiguous().t(), "x_pos"), (torch.rand(9, 10), "x_pos")):
            try:
                forward_gemm.launch_forward(bad, x_neg, w, None, "l2", 1e-4, store_r=True)
            except ValueError as error:
                assert name in str(error), error
                print("raised", name)
        """
    )
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n").count("raised x_pos") == 2, result.stdout + result.stderr


@pytest.mark.parametrize(
    "version,supported", [("3.0.0", True), ("3.9.0", True), ("3.9.1+git", True), ("2.3.1", False), ("3.10.0", False)]
)
def test_triton_outside_the_checked_range_is_refused_with_the_fix(version: str, supported: bool) -> None:
    reason = backends.triton_version_reason(version)
    assert (reason is None) == supported
    if not supported:
        assert version in reason and "ff-kernels[triton]" in reason
