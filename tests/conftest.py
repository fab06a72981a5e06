import os

os.environ.setdefault("NF4KIT_POISON", "1")  # kernels' outputs start as NaN / 0xA5 (csrc/common.h)

import pytest
import torch

import nf4kit  # noqa: F401  (loads the ops)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape filled with a value no kernel writes on purpose."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, 0xA5 if t.dtype == torch.uint8 else -77)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for bit-for-bit comparisons."""
    t = t.contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}[t.element_size()])
