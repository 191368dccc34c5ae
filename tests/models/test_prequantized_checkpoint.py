"""A tiny Llama saved as an AWQ or GPTQ checkpoint loads into QuantizedLinear layers and decodes as its source.

The checkpoint is written here the way the formats' tools write one: each decoder layer's linear weight
quantized (min/max, 4-bit, group 32), its codes packed by the format's rules (the reference packers of
tests/unit/test_prequantized_layouts.py), a config.json carrying `quantization_config`. The model it should
match is the same tiny Llama holding the format's own dequantized weights in plain nn.Linear layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaForCausalLM

from shared.engine.quantized_linear import QuantizedLinear
from shared.models.prequantized import PrequantizedError, load_prequantized_linears
from tests.models import tiny
from tests.unit.test_prequantized_layouts import awq_pack, gptq_pack_columns, gptq_pack_rows

pytestmark = pytest.mark.models

GROUP = 32  # the tiny Llama's 64 hidden and 128 intermediate features
PROMPT = "Which specialist should handle the user's message?"
CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq"},
}


def quantized_tensors(method: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One layer's packed tensors in `method`'s layout, and the weight the format's formula gives back."""
    out_features, in_features = weight.shape
    wide = weight.float().view(out_features, in_features // GROUP, GROUP)
    low, high = wide.amin(dim=2), wide.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-5).half()
    zeros = torch.round(-low / scales.float()).clamp(1, 15).long()  # >= 1: GPTQ v1 stores z - 1
    codes = (torch.round(wide / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).long()
    dequantized = ((codes - zeros[..., None]).float() * scales.float()[..., None]).view(out_features, in_features)
    codes = codes.view(out_features, in_features).T  # [in, out], as both formats index it
    if method == "awq":
        packed = {"qweight": awq_pack(codes), "qzeros": awq_pack(zeros.T), "scales": scales.T.contiguous()}
    else:
        packed = {"qweight": gptq_pack_rows(codes), "qzeros": gptq_pack_columns(zeros.T - 1),
                  "scales": scales.T.contiguous(), "g_idx": (torch.arange(in_features) // GROUP).to(torch.int32)}
    return packed, dequantized


def save_prequantized(method: str, folder: Path) -> LlamaForCausalLM:
    """Save a tiny Llama as a `method` checkpoint in `folder`; returns the source holding the dequantized weights."""
    source = tiny.build_model("llama", tiny.build_tokenizer()).float().eval()
    state = {name: tensor.contiguous() for name, tensor in source.state_dict().items()}
    for name, module in source.named_modules():
        if type(module) is torch.nn.Linear and ".layers." in name:
            packed, dequantized = quantized_tensors(method, module.weight.detach())
            del state[f"{name}.weight"]
            state.update({f"{name}.{part}": tensor for part, tensor in packed.items()})
            module.weight.data = dequantized
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors")
    config = source.config.to_dict() | {"quantization_config": CONFIGS[method]}
    (folder / "config.json").write_text(json.dumps(config))
    return source


def load(folder: Path) -> tuple[LlamaForCausalLM, list[str]]:
    """The checkpoint through load_prequantized_linears, its other tensors through load_state_dict."""
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    model = LlamaForCausalLM(AutoConfig.from_pretrained(folder)).float().eval()
    replaced = load_prequantized_linears(model, state, config)
    rest = {name: tensor for name, tensor in state.items() if name.rpartition(".")[0] not in replaced}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    assert unexpected == []
    assert {name.rpartition(".")[0] for name in missing} <= set(replaced)  # only the packed layers' buffers
    return model, replaced


def greedy(model: LlamaForCausalLM) -> tuple[list[int], torch.Tensor]:
    """Eight greedy tokens after PROMPT (one row a step after the prompt) and the last step's logits."""
    ids = tiny.build_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, ids.shape[1]:].tolist(), out.logits[-1]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_prequantized_llama_decodes_the_greedy_tokens_of_its_dequantized_source(method: str,
                                                                                   tmp_path: Path) -> None:
    source = save_prequantized(method, tmp_path)
    model, replaced = load(tmp_path)
    linears = [name for name, module in source.named_modules() if type(module) is torch.nn.Linear]
    assert replaced == sorted(name for name in linears if ".layers." in name) and len(replaced) == 14
    assert all(isinstance(model.get_submodule(name), QuantizedLinear) for name in replaced)
    assert type(model.lm_head) is torch.nn.Linear  # the head was not packed, so it stays as it was
    tokens, logits = greedy(model)
    source_tokens, source_logits = greedy(source)
    assert tokens == source_tokens
    torch.testing.assert_close(logits, source_logits, atol=1e-5, rtol=1e-5)


def test_a_packed_weight_for_a_module_the_model_lacks_is_refused(tmp_path: Path) -> None:
    save_prequantized("awq", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state = {name.replace("layers.1.", "layers.7."): tensor for name, tensor in state.items()}
    model = LlamaForCausalLM(AutoConfig.from_pretrained(tmp_path))
    with pytest.raises(PrequantizedError, match=r"model\.layers\.7\..* but the model has no module there"):
        load_prequantized_linears(model, state, {"quantization_config": CONFIGS["awq"]})
