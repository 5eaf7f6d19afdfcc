"""The backend table: every entry names a real function, and a missing (op, backend) pair says what exists."""

from __future__ import annotations

import importlib.util

import pytest

from ff_kernels import dispatch


@pytest.mark.parametrize("key", list(dispatch.TABLE), ids=lambda k: f"{k[0]}-{k[1]}")
def test_every_entry_names_a_function(key) -> None:
    entry = dispatch.TABLE[key]
    if key[1] == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    assert callable(entry.load())


def test_missing_pair_lists_the_available_backends() -> None:
    with pytest.raises(NotImplementedError, match=r"linear_step has no backend='nope'.*reference, torch"):
        dispatch.spec("linear_step", "nope")


def test_compute_dtype_is_a_feature_of_every_linear_backend_but_the_reference() -> None:
    """The torch backend, the Triton kernels (inputs and a weight copy cast, the update on the fp32 master) and the
    extension (its CPU operator; its CUDA kernels run in the parameters' dtype)."""
    for op in ("linear_step", "linear_forward"):
        supporting = [b for b in dispatch.backends_for(op) if dispatch.spec(op, b).compute_dtype]
        assert sorted(supporting) == ["cuda", "torch", "triton"]
