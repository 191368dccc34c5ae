"""A model whose linear layers are int8/int4 decodes through the kernels exactly as its dequantized twin does."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.engine.quantized_linear import QuantizedLinear, decoder_layers, quantize_linears
from shared.kernels import quant_gemv
from tests.models import tiny
from tests.models.test_fused_decode import greedy

pytestmark = pytest.mark.models


STEPS = 3  # each step runs every kernel under the interpreter: a few seconds each


def dequantized_twin(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every QuantizedLinear turned back into an nn.Linear holding its dequantized weight."""
    twin = copy.deepcopy(model)
    for layer in decoder_layers(twin):
        for name, module in list(layer.named_modules()):
            if isinstance(module, QuantizedLinear):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight.data = quant_gemv.dequantize(module.quantized_weight()).to(module.scales.dtype)
                if module.bias is not None:
                    linear.bias.data = module.bias.clone()
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], linear)
    return twin


@pytest.mark.parametrize("form", quant_gemv.FORMS)
def test_a_quantized_llama_decodes_as_its_dequantized_twin(form: str) -> None:
    model = tiny.build_model("llama", tiny.build_tokenizer()).float().eval()
    linears = sum(isinstance(m, torch.nn.Linear) for layer in decoder_layers(model) for m in layer.modules())
    assert quantize_linears(model, form, group=32) == linears > 0
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head stays as it was
    tokens, logits = greedy(model, steps=STEPS)  # one row a step: the kernel (under the interpreter here)
    twin_tokens, twin_logits = greedy(dequantized_twin(model), steps=STEPS)
    assert tokens == twin_tokens
    torch.testing.assert_close(logits, twin_logits, atol=1e-4, rtol=1e-4)


def test_a_model_without_decoder_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="no decoder layers"):
        quantize_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int8")
    with pytest.raises(ValueError, match="expected one of int8, int4"):
        quantize_linears(torch.nn.Sequential(), "nf4")
