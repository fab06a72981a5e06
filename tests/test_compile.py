"""torch.compile(fullgraph=True) on a model of Linear4bit layers: one graph, the eager outputs."""
import pytest
import torch
from torch import nn

import nf4kit
from nf4kit import BitsAndBytesConfig, Linear4bit

dynamo_testing = pytest.importorskip("torch._dynamo.testing")


def quantized_mlp(device, quant_type="nf4", nested=True, storage=torch.uint8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64, bias=False), nn.LayerNorm(64),
                          nn.Linear(64, 32))
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                             bnb_4bit_quant_storage=storage, llm_int8_skip_modules=[])
    model = nf4kit.quantize_model(model.to(device), cfg, compute_dtype=None)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 3
    return model.eval()


@pytest.mark.parametrize("quant_type, nested, storage", [("nf4", True, torch.uint8), ("fp4", False, torch.bfloat16)])
def test_one_graph_same_outputs(device, quant_type, nested, storage):
    model = quantized_mlp(device, quant_type, nested, storage)
    x = torch.randn(4, 7, 128, device=device)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        counter = dynamo_testing.CompileCounterWithBackend("aot_eager")
        got = torch.compile(model, fullgraph=True, backend=counter)(x)
    assert counter.frame_count == 1  # fullgraph=True would raise on a graph break; one frame, one graph
    assert torch.equal(got, expected)


def test_backward_through_compiled_model(device):
    model = quantized_mlp(device)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    model(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    assert torch.equal(x.grad, expected)


def test_inductor(device):
    model = quantized_mlp(device)
    x = torch.randn(5, 128, device=device)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(x)
    # inductor fuses GELU / LayerNorm around the 4-bit matmuls: float rounding may differ in the last bits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
