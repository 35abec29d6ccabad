"""frontier.dequant: dequantized copies of frozen quantized linears compute the kernels' function."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from frontier import dequant
from frontier import quantize as Q


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("layers", nn.ModuleList([nn.Linear(128, 96, bias=False), nn.Linear(96, 128, bias=True)]))
    m.forward = lambda x: m.layers[1](torch.relu(m.layers[0](x)))
    return m


def _quantize(model, q: dict) -> None:
    if q["method"] == "awq":  # AWQ's pre-scale lives on the weight; quantize one Linear at a time by hand
        from torchao.prototype.awq import AWQConfig
        from torchao.prototype.awq.core import AWQObservedLinear
        from torchao.quantization import quantize_

        from frontier.quantize import calibrated
        from frontier.quantize.rtn import WeightOnlyConfig

        base = WeightOnlyConfig(bits=q["bits"], group_size=32, kernel=False)
        x = torch.randn(64, 128) * (1 + 10 * (torch.arange(128) % 17 == 0))  # a few salient channels
        quantize_(model, AWQConfig(base, step="prepare"), filter_fn=lambda m, f: isinstance(m, nn.Linear))
        model(x)
        with torch.no_grad():
            quantize_(model, AWQConfig(base, step="convert"), filter_fn=lambda m, f: isinstance(m, AWQObservedLinear))
        for lin in model.layers:
            lin.weight = nn.Parameter(calibrated.repack(lin.weight), requires_grad=False)
        assert model.layers[0].weight.act_pre_scale is not None
        return
    from torchao.quantization import quantize_

    quantize_(model, Q.torchao_config(q, "cpu"), filter_fn=lambda m, f: isinstance(m, nn.Linear))


@pytest.mark.parametrize("q", [
    {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},   # frontier Int8RowTensor kernel
    {"method": "rtn", "bits": 4, "group_size": 32},                        # torchao Int4OpaqueTensor kernel
    {"method": "rtn", "bits": 3, "group_size": 32},                        # packed codes (dequant storage)
    {"method": "hqq", "bits": 4, "group_size": 32},
    {"method": "awq", "bits": 4},                                          # activation pre-scale folded in
    {"method": "awq", "bits": 3},
], ids=["int8", "int4_g32", "int3_g32", "hqq4", "awq4", "awq3"])
def test_dense_view_computes_the_kernel_function_and_restores_it(q):
    model = _mlp()
    _quantize(model, q)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 16, 128)
    with torch.no_grad():
        ref = model(x)
    with dequant.dense_view(model) as names:
        assert len(names) == 2
        assert all(hasattr(lin, "_frontier_dense_weight") for lin in model.layers)
        with torch.no_grad():
            dense = model(x)
    assert (dense - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert not any(hasattr(lin, "_frontier_dense_weight") or "forward" in lin.__dict__ for lin in model.layers)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the kernels again, bit for bit


def test_dense_view_leaves_activation_quantized_weights_on_their_kernels():
    model = _mlp()
    _quantize(model, {"method": "w8a8", "bits": 8})
    assert dequant.has_act_quant(model.layers[0].weight)
    with dequant.dense_view(model) as names:
        assert names == []
    assert len(dequant.dense_linears(model, skip_act_quant=False)) == 2  # fine-tuning's choice
    assert dequant.restore_kernels(model) == 2


def test_dense_view_respects_the_size_cap_and_skips_plain_weights():
    model = _mlp()
    with dequant.dense_view(model) as names:
        assert names == []  # nothing quantized
    _quantize(model, {"method": "rtn", "bits": 4, "group_size": 32})
    with dequant.dense_view(model, max_bytes=1000) as names:
        assert names == []  # two fp32 128x96 copies need 98 KB
