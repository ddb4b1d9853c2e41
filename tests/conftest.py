"""Devices and dtypes the numerical tests run on (``cpu``, plus ``cuda`` when one is visible), and their tolerances.

A test that asks for the ``device`` fixture runs once per entry of :data:`DEVICES`, so the same suite verifies a GPU
run (``benchmarks/gpu_check.sh``). ``DERS_TEST_DEVICES=cuda`` (comma-separated) restricts the list.
"""

from __future__ import annotations

import os

import pytest
import torch

_AVAILABLE = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
DEVICES: tuple[str, ...] = tuple(
    d for d in os.environ.get("DERS_TEST_DEVICES", ",".join(_AVAILABLE)).split(",") if d in _AVAILABLE
) or ("cpu",)

FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}

BF16_REL_TOL = 0.03
"""bf16 keeps 8 significant bits: each rounding of a result is off by at most u = 2**-8 = 0.0039 of its value. A bf16
routed layer rounds about five times in a row (base/delta products, pre-activation, activation * up, router mix,
down projection), so its error against an fp32 reference of the same weights is bounded by about 5u = 0.02 of the
output's scale (a little more after cancellations in sums). Measured on CPU (the bf16 cases of
tests/test_layer_reference.py, largest |got - want| / max|want| per tensor): outputs 0.004-0.008, gradients
(input and every parameter) 0.008-0.012. Compared as ``|got - want| <= BF16_REL_TOL * max|want|``: 2.4 times the
worst measured error, still below 8u = 0.031 (a wrong expert or a missing delta is off by far more: the tests check
that the deltas move the output by more than the tolerance)."""


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn."""
    return torch.device(request.param)


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor, what: str = "output") -> float:
    """``|got - want| <= BF16_REL_TOL * max|want|`` elementwise (``want`` an fp32 reference); returns the measured
    relative error (max |got - want| / max |want|)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), what
    scale = want.abs().max().clamp_min(1e-12)
    err = float((got - want).abs().max() / scale)
    assert err <= BF16_REL_TOL, f"{what}: bf16 error {err:.4f} of max|want| exceeds {BF16_REL_TOL}"
    return err


@pytest.fixture(scope="session")
def built_kernels():
    """The compiled CPU kernels (``ders_peft.kernels``), built once per run; skips where no compiler or ninja."""
    from ders_peft import kernels

    try:
        return kernels.build()
    except RuntimeError as err:
        pytest.skip(str(err))
