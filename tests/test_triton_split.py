"""GEMM 2 split over the rows (DESIGN 10: at least one wave of the H100's SMs): the split against the reference
with every optimizer, odd row counts and several split counts (forced through the launcher), bit-identical
reruns, and the host policy that chooses the split (checked on the GPU configs, without a GPU).

Under the interpreter the programs run one after the other, so the last to arrive at a tile is its last split; the
sum in split order makes the result independent of that order anyway.
"""

from __future__ import annotations

import pytest
import torch
import triton

from ff_kernels import optim
from ff_kernels._options import check_step_options
from ff_kernels.bench import DESIGN_KN
from ff_kernels.ops.scaling import coefficient_scale
from ff_kernels.ops.triton import common, forward_gemm, grad_update_gemm
from ff_kernels.ops.triton.common import OPT_ADAM, OPT_NONE, OPT_SGD
from ff_kernels.ops.triton.grad_update_gemm import Update, launch_grad_update
from ff_kernels.ops.triton.ops import ff_linear_step_triton
from ff_kernels.ops.triton.row_loss import launch_row_step
from ff_kernels.reference import ff_linear_step_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# P + Q = 67 rows: three row steps of 32 under the interpreter, the last one partial. With 5 splits the last two
# are empty (each split takes whole row steps), with 2 one split holds both batches' rows.
P, Q, K, N = 37, 30, 45, 70


def _inputs(seed: int = 0, bias: bool = True) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x_pos, x_neg = torch.rand(P, K, generator=gen), torch.rand(Q, K, generator=gen)
    w = torch.randn(N, K, generator=gen) * (2.0 / K) ** 0.5
    b = torch.randn(N, generator=gen) * 0.1 if bias else None
    return tuple(None if t is None else t.to(DEVICE) for t in (x_pos, x_neg, w, b))


def _options(loss: str = "logistic", normalize: str = "l2"):
    return check_step_options(
        threshold=2.0, goodness="mean", loss=loss, normalize=normalize, eps=1e-4, alpha=4.0, out_features=N
    )


def _update(optimizer: optim.FusedOptimizer | None, w: torch.Tensor, b: torch.Tensor | None) -> Update:
    """The kernel's description of one step of ``optimizer`` (the custom ops build the same from their arguments)."""
    if optimizer is None:
        return Update(OPT_NONE)
    hyper = {"lr": float(optimizer.lr), "weight_decay": float(optimizer.weight_decay)}
    if isinstance(optimizer, optim.SGD):
        (buf_w, buf_b), (first_w, first_b) = optimizer.fused_state(w, b)
        return Update(
            OPT_SGD,
            s1w=buf_w,
            s1b=buf_b,
            momentum=float(optimizer.momentum),
            dampening=float(optimizer.dampening),
            nesterov=bool(optimizer.nesterov),
            first_w=first_w,
            first_b=first_b,
            **hyper,
        )
    (m_w, v_w, m_b, v_b), (step_w, bc2_w, step_b, bc2_b) = optimizer.fused_state(w, b)
    beta1, beta2 = optimizer.betas
    return Update(
        OPT_ADAM,
        s1w=m_w,
        s2w=v_w,
        s1b=m_b,
        s2b=v_b,
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(optimizer.eps),
        decoupled=bool(optimizer.decoupled_weight_decay),
        step_size_w=step_w,
        bc2_sqrt_w=bc2_w,
        step_size_b=step_b,
        bc2_sqrt_b=bc2_b,
        **hyper,
    )


def _split_step(x_pos, x_neg, w, b, opts, optimizer, splits):
    """One step through the three launchers with GEMM 2's row split forced: (grad_weight, grad_bias)."""
    h, r, partials, tiles_n = forward_gemm.launch_forward(x_pos, x_neg, w, b, opts.normalize, opts.eps, store_r=True)
    _, c, _ = launch_row_step(partials, tiles_n, x_pos.shape[0], x_neg.shape[0], opts, None, None)
    scale = coefficient_scale(opts, x_pos.shape[0], x_neg.shape[0])
    return launch_grad_update(
        x_pos, x_neg, h, c, r, w, b, opts.normalize, scale, _update(optimizer, w, b), splits=splits
    )


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-12, msg=name)


def _sgd_nesterov(params):
    return optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)


def _sgd_dampened(params):
    return optim.SGD(params, lr=0.05, momentum=0.8, dampening=0.3)


def _adam(params):
    return optim.Adam(params, lr=1e-2, weight_decay=1e-2)


def _adamw(params):
    return optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_split_gradients_match_reference(splits, bias):
    x_pos, x_neg, w, b = _inputs(bias=bias)
    opts = _options(normalize="rms")
    grad_w, grad_b = _split_step(x_pos, x_neg, w, b, opts, None, splits)
    ref = ff_linear_step_ref(x_pos, x_neg, w, b, opts)
    _assert_close(grad_w, ref.grad_weight, "grad_weight")
    if bias:
        _assert_close(grad_b, ref.grad_bias, "grad_bias")
    else:
        assert grad_b is None


@pytest.mark.parametrize("make_opt", [_sgd_nesterov, _sgd_dampened, _adam, _adamw])
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_update_matches_optimizer(make_opt, splits):
    """Two fused steps with the split against optimizer.update on the reference gradients: the update is applied
    once per element (a second application would show in the parameters and in the state)."""
    _, _, w, b = _inputs()
    w_ref, b_ref = w.clone(), b.clone()
    opt, opt_ref = make_opt([w, b]), make_opt([w_ref, b_ref])
    opts = _options(loss="symba" if make_opt is _sgd_dampened else "logistic")
    for step in range(2):
        x_pos, x_neg, _, _ = _inputs(seed=step + 1)
        if opts.loss == "symba":
            x_neg = x_neg[: min(P, Q)].contiguous()
            x_pos = x_pos[: min(P, Q)].contiguous()
        ref = ff_linear_step_ref(x_pos, x_neg, w_ref, b_ref, opts)
        _split_step(x_pos, x_neg, w, b, opts, opt, splits)
        opt_ref.update([w_ref, b_ref], [ref.grad_weight, ref.grad_bias])
        for p, p_ref, label in ((w, w_ref, "weight"), (b, b_ref, "bias")):
            _assert_close(p, p_ref, f"step {step} {label}")
            state, state_ref = opt.check_holds(label, p), opt_ref.check_holds(label, p_ref)
            for key, value in state_ref.items():
                if isinstance(value, torch.Tensor):
                    _assert_close(state[key], value, f"step {step} {label} {key}")


@pytest.mark.parametrize("make_opt", [None, _sgd_nesterov, _adamw])
def test_split_runs_are_bit_identical(make_opt):
    """Two runs of the split GEMM 2 from the same state agree bit for bit (fixed-order reduction, no float
    atomics), and the counters the first run leaves behind are back at zero for the second."""
    results = []
    for _ in range(2):
        x_pos, x_neg, w, b = _inputs()
        opt = None if make_opt is None else make_opt([w, b])
        grads = _split_step(x_pos, x_neg, w, b, _options(), opt, splits=3)
        state = [] if opt is None else [v for p, n in ((w, "weight"), (b, "bias")) for v in _tensors(opt, n, p)]
        results.append([t for t in (*grads, w, b, *state) if t is not None])
    for first, second in zip(*results):
        assert torch.equal(first, second)


def _tensors(opt: optim.FusedOptimizer, name: str, param: torch.Tensor) -> list[torch.Tensor]:
    return [v for v in opt.check_holds(name, param).values() if isinstance(v, torch.Tensor)]


def test_default_launch_splits_a_small_layer():
    """With many rows and few weight tiles the launcher splits by itself; the public step matches the reference."""
    rows_pos, rows_neg, k, n = 1030, 1031, 20, 12
    tiles = grad_update_gemm.weight_tiles(n, k, common.GRAD_CONFIGS[0].kwargs)
    assert grad_update_gemm.split_count(tiles, rows_pos + rows_neg, common.H100_SMS) > 1
    gen = torch.Generator().manual_seed(3)
    x_pos, x_neg = torch.rand(rows_pos, k, generator=gen).to(DEVICE), torch.rand(rows_neg, k, generator=gen).to(DEVICE)
    w, b = (torch.randn(n, k, generator=gen) * 0.3).to(DEVICE), (torch.randn(n, generator=gen) * 0.1).to(DEVICE)
    opts = check_step_options(
        threshold=2.0, goodness="mean", loss="logistic", normalize="l2", eps=1e-4, alpha=4.0, out_features=n
    )
    out = ff_linear_step_triton(x_pos, x_neg, w, b, opts)
    ref = ff_linear_step_ref(x_pos, x_neg, w, b, opts)
    _assert_close(out.grad_weight, ref.grad_weight, "grad_weight")
    _assert_close(out.grad_bias, ref.grad_bias, "grad_bias")


# ---------------------------------------------------------------------------------------------------------------
# The host policy, on the GPU configs (importable without a GPU): DESIGN 10's wave gate at DESIGN 4's shapes.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows_each", [4096, 25000])
@pytest.mark.parametrize("k,n", DESIGN_KN)
@pytest.mark.parametrize("precision", common.PRECISIONS)
def test_both_gemms_fill_a_wave_at_design_shapes(rows_each, k, n, precision):
    rows, sms = 2 * rows_each, common.H100_SMS
    for config in common.GPU_FORWARD_CONFIGS[precision]:
        (programs,) = forward_gemm.forward_grid(rows_each, rows_each, n, config.kwargs)
        assert programs >= sms, ("GEMM 1", config)
    candidates = grad_update_gemm.grad_candidates(precision, n, k, rows, sms, common.GPU_GRAD_CONFIGS)
    assert candidates
    for config in candidates:
        # a wave of GEMM 2 is the SMs times the config's resident blocks per SM, as inspect's gate counts it
        blocks = grad_update_gemm.resident_blocks(precision, config.kwargs)
        assert blocks == common.GRAD_RESIDENT_BLOCKS[precision][tuple(config.kwargs.values())]
        splits = grad_update_gemm.grad_splits(precision, n, k, rows, sms, config.kwargs)
        (programs,) = grad_update_gemm.grad_grid(n, k, config.kwargs, splits)
        assert programs >= sms * blocks, ("GEMM 2", config, blocks, splits)
        assert splits <= grad_update_gemm.MAX_SPLITS
        # the fewest splits that fill it: one fewer would not
        assert splits == 1 or (splits - 1) * grad_update_gemm.weight_tiles(n, k, config.kwargs) < sms * blocks


def test_split_count_policy():
    sms = common.H100_SMS
    assert grad_update_gemm.split_count(sms, 10**6, sms) == 1  # a full wave of tiles: no split
    assert grad_update_gemm.split_count(2 * sms, 10**6, sms, blocks=2) == 1  # two resident blocks per SM
    assert grad_update_gemm.split_count(28, 8192, sms) == 5  # the fewest that fill a wave
    assert grad_update_gemm.split_count(28, 8192, sms, blocks=2) == grad_update_gemm.MAX_SPLITS  # capped: 10 would
    assert grad_update_gemm.split_count(64, 8192, sms) == 3
    assert grad_update_gemm.split_count(64, 8192, sms, blocks=2) == 5  # 2 x 132 resident: 5 x 64 programs
    assert grad_update_gemm.split_count(64, 2048, sms) == 2  # MIN_SPLIT_ROWS at least per split
    assert grad_update_gemm.split_count(64, 2047, sms) == 1
    small = grad_update_gemm.grad_candidates("bf16", 500, 500, 1024, sms, common.GPU_GRAD_CONFIGS)
    most = max(grad_update_gemm.weight_tiles(500, 500, c.kwargs) for c in common.GPU_GRAD_CONFIGS["bf16"])
    assert all(grad_update_gemm.weight_tiles(500, 500, c.kwargs) == most for c in small)  # launch-bound: most tiles


@pytest.mark.parametrize("precision", common.PRECISIONS)
def test_workspace_is_the_fewest_splits_and_independent_of_the_batch(precision):
    """The candidates of a split shape share the fewest splits that fill a wave, so the workspace (one fp32
    weight per split) is the smallest any config allows; it does not grow with the batch."""
    sms, table = common.H100_SMS, common.GPU_GRAD_CONFIGS
    for k, n in DESIGN_KN:
        sizes = set()
        for rows in (8192, 50000):
            candidates = grad_update_gemm.grad_candidates(precision, n, k, rows, sms, table)
            fewest = {grad_update_gemm.grad_splits(precision, n, k, rows, sms, c.kwargs) for c in candidates}
            assert len(fewest) == 1
            for config in table[precision]:
                splits = grad_update_gemm.grad_splits(precision, n, k, rows, sms, config.kwargs)
                tiles = grad_update_gemm.weight_tiles(n, k, config.kwargs)
                if tiles * splits >= sms * grad_update_gemm.resident_blocks(precision, config.kwargs):
                    assert splits >= min(fewest)
            sizes.add(4 * min(fewest) * (n * k + n) if min(fewest) > 1 else 0)
        assert len(sizes) == 1


def test_forced_split_must_be_positive():
    x_pos, x_neg, w, b = _inputs()
    with pytest.raises(ValueError, match="splits"):
        _split_step(x_pos, x_neg, w, b, _options(), None, splits=0)


def test_alignment_hint_is_a_divisor():
    for n in (1, 2, 3, 12, 500, 784, 2000, 4096, 4097):
        a = common.alignment(n)
        assert n % a == 0 and a <= 16 and a & (a - 1) == 0
        assert common.alignment(n) == min(16, triton.next_power_of_2(n & -n))
