"""Shape-dispatched quantized linears (`frontier.quantize.fastpath`): the same function as the
dequantized weight, at one token and at many, forward and backward, with no dense copy kept.

References are independent of fastpath's own dequantization: `Codes.dequantize` for weights
built from codes, torch's int4 kernel applied to the identity for torchao-quantized int4,
bitsandbytes' `dequantize_4bit` for NF4.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from frontier import checkpoint, dequant
from frontier import cpu_kernels
from frontier.quantize import fastpath as FP
from frontier.quantize import rtn
from frontier.quantize.tensors import Codes, Int8RowTensor, PackedIntxTensor, int4_opaque_from_codes, pack

ROWS = (1, 3, 40)  # decode kernel (<= DECODE_MAX_ROWS) and dequantize + dense matmul
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _w(n=192, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _int4_kernel_dense(t) -> torch.Tensor:
    """[N, K] fp32 weight as torch's CPU int4 kernel computes it (the kernel applied to I)."""
    k = t.shape[1]
    sz = t.scale_and_zero.float()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), t.qdata, t.block_size[1], sz)[:, :t.shape[0]].t()


def _formats(dtype):
    """[(name, weight tensor, reference fp32 dense [N, K], activation pre-scale or None)]."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

    w = _w()
    out = []
    c8 = rtn.rtn_codes(w, 8, None, True)
    out.append(("int8_row", Int8RowTensor.from_codes(c8, dtype), c8.dequantize()))
    for g in (32, 64):
        c = rtn.rtn_codes(w, 4, g, False)
        out.append((f"int4_g{g}", int4_opaque_from_codes(c, dtype), c.dequantize()))
    h = Int4OpaqueTensor.from_hp(w.to(dtype), [1, 64], int4_choose_qparams_algorithm=Int4ChooseQParamsAlgorithm.HQQ)
    out.append(("hqq4_g64", h, _int4_kernel_dense(h)))
    for bits, g, sym in ((3, 32, False), (8, 32, False), (5, 64, True)):
        c = rtn.rtn_codes(w, bits, g, sym)
        out.append((f"packed{bits}_g{g}", PackedIntxTensor.from_codes(c, dtype), c.dequantize()))
    pre = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5
    for bits in (4, 3):  # AWQ: codes of W·s, activations times 1/s
        c = rtn.rtn_codes(w / pre, bits, 32, False)
        t, _ = pack(c, dtype)
        t.act_pre_scale = pre.to(dtype)
        out.append((f"awq{bits}", t, c.dequantize()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_paths_compute_the_dequantized_function_forward_and_backward(dtype):
    for name, t, ref_w, in [f[:3] for f in _formats(dtype)]:
        pre = getattr(t, "act_pre_scale", None)
        for rows in ROWS:
            x = torch.randn(2, rows, t.shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
            xs = x.float() * (pre.float() if pre is not None else 1.0)
            ref = xs @ ref_w.T
            xg = x.clone().requires_grad_(True)
            y = F.linear(xg, t)
            assert y.dtype == dtype and y.shape == (2, rows, t.shape[0])
            err = (y.float() - ref).abs().max() / ref.abs().max()
            assert err <= TOL[dtype], (name, rows, err.item())
            g = torch.randn_like(y)
            y.backward(g)
            gref = (g.float() @ ref_w) * (pre.float() if pre is not None else 1.0)
            gerr = (xg.grad.float() - gref).abs().max() / gref.abs().max()
            assert gerr <= TOL[dtype], (name, rows, gerr.item())
            with torch.no_grad():  # the inference path is the same function
                assert torch.equal(F.linear(x, t), y.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_linear_is_bitsandbytes_function_and_never_repacks(dtype):
    import bitsandbytes as bnb

    lin = nn.Linear(128, 192, bias=True).to(dtype)
    q = rtn.nf4_linear(lin, 64).eval()
    assert isinstance(q, bnb.nn.Linear4bit)
    before = (q.weight.data.clone(), checkpoint.tensor_bytes(q.weight))
    ref_w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    for rows in ROWS:
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(dtype)
        with torch.inference_mode():  # bitsandbytes' own CPU path would repack the weight here
            y = q(x)
        ref = x.float() @ ref_w.T + q.bias.float()
        assert (y.float() - ref).abs().max() / ref.abs().max() <= TOL[dtype]
        xg = x.clone().requires_grad_(True)
        q(xg).sum().backward()
        gref = torch.ones(rows, 192) @ ref_w
        assert (xg.grad.float() - gref).abs().max() / gref.abs().max() <= TOL[dtype]
    assert torch.equal(q.weight.data, before[0]) and checkpoint.tensor_bytes(q.weight) == before[1]
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("n", [64, 80, 96, 112, 192])
def test_int4_layout_unpacks_to_the_stored_codes(n):
    c = rtn.rtn_codes(_w(n, 128), 4, 32, False)
    t = int4_opaque_from_codes(c, torch.float32)
    assert torch.equal(FP.int4_opaque_codes(t), c.q)


def test_decode_kernels_by_dtype_and_rows():
    c = rtn.rtn_codes(_w(), 4, 32, False)
    t = int4_opaque_from_codes(c, torch.bfloat16)
    assert FP.decode_kernel(t, torch.bfloat16) is FP.CANDIDATES["Int4OpaqueTensor"]["int4pack_mm (aten)"]
    t8 = Int8RowTensor.from_codes(rtn.rtn_codes(_w(), 8, None, True), torch.bfloat16)
    assert FP.decode_kernel(t8, torch.bfloat16) is FP.CANDIDATES["Int8RowTensor"]["int8pack_mm (aten)"]
    p = PackedIntxTensor.from_codes(rtn.rtn_codes(_w(), 3, 32, False), torch.float32)
    assert FP.decode_kernel(p, torch.float32) is FP.CANDIDATES["PackedIntxTensor"]["dequant+matmul"]
    # every candidate computes the same function at one token
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    ys = [fn(x, t).float() for fn in FP.CANDIDATES["Int4OpaqueTensor"].values()]
    assert all((y - ys[0]).abs().max() <= 2e-2 * ys[0].abs().max() for y in ys)


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 192, bias=False), nn.ReLU(), nn.Linear(192, 128, bias=True)).to(dtype)
    for lin in (m[0], m[2]):
        t, _ = pack(rtn.rtn_codes(lin.weight.detach().float(), 4, 32, False), dtype)
        lin.weight = nn.Parameter(t, requires_grad=False)
    return m


def test_no_dense_weight_is_kept_and_bytes_at_rest_do_not_change(monkeypatch):
    monkeypatch.setattr(FP, "COMPILE_MIN_WEIGHTS", 0)  # route through the shared scratch where it can
    FP._SCRATCH.clear()
    m = _mlp()
    at_rest = [checkpoint.tensor_bytes(lin.weight) for lin in (m[0], m[2])]
    ids = [id(lin.weight.qdata) for lin in (m[0], m[2])]
    x = torch.randn(4, 30, 128, requires_grad=True)
    with torch.inference_mode():  # the scratch is first made here, then written by training below
        m(x.detach())
    m(x).pow(2).sum().backward()
    with torch.no_grad():
        m(x[:, :1])
    assert dequant.dense_attributes(m) == []
    assert [checkpoint.tensor_bytes(lin.weight) for lin in (m[0], m[2])] == at_rest
    assert [id(lin.weight.qdata) for lin in (m[0], m[2])] == ids
    # at most one layer's dense weight: the shared scratch holds the largest layer (fp32 192 x 128)
    # and, for the int4 kernel's layout, that layer's packed bytes transposed (192 x 128 / 2)
    assert FP.scratch_bytes() <= 4 * 192 * 128 + 192 * 128 // 2


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_dequantize_and_decode_kernels_compute_the_same_function(dtype, monkeypatch):
    monkeypatch.setattr(FP, "COMPILE_MIN_WEIGHTS", 0)
    monkeypatch.setenv(FP.COMPILE_ENV, "1")
    FP._SCRATCH.clear()
    for name, t, ref_w in [f[:3] for f in _formats(dtype) if f[0] in ("int8_row", "int4_g32", "hqq4_g64", "packed3_g32", "packed8_g32", "packed5_g64", "awq3")]:
        for rows in (1, 40):
            x = torch.randn(rows, t.shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
            pre = getattr(t, "act_pre_scale", None)
            ref = (x.float() * (pre.float() if pre is not None else 1.0)) @ ref_w.T
            with torch.no_grad():
                y = F.linear(x, t)
            assert (y.float() - ref).abs().max() / ref.abs().max() <= TOL[dtype], (name, rows)
        d = FP.dense(t, dtype)
        assert torch.equal(d, FP._dense(t, dtype, scratch=True))
    assert FP._FAILED == set(), "a compiled kernel failed and fell back to eager"
    n, k = 192, 128
    # one layer, reused: its dense weight (and the int4 layout's bytes transposed, n x k / 2, where
    # Inductor's pass dequantizes int4 instead of the C kernel)
    transposed = 0 if cpu_kernels.library() is not None else n * k // 2
    assert FP.scratch_bytes() == n * k * torch.empty((), dtype=dtype).element_size() + transposed


def _dense_three_ways(t, dtype, monkeypatch):
    """`FP.dense(t)` by the C kernel, the compiled pass and the eager passes (in that order)."""
    with_c = FP.dense(t, dtype)
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    cpu_kernels.library.cache_clear()
    compiled = FP.dense(t, dtype)
    monkeypatch.setenv(FP.COMPILE_ENV, "0")
    eager = FP.dense(t, dtype)
    monkeypatch.delenv(cpu_kernels.ENV)
    monkeypatch.setenv(FP.COMPILE_ENV, "1")
    cpu_kernels.library.cache_clear()
    return with_c, compiled, eager


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="the C kernels need a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int4_c_kernel_is_bit_equal_to_the_compiled_and_eager_passes(dtype, monkeypatch):
    """csrc/int4_dequant.c reads torch's CPU int4 layout directly; the dense weight it writes is the
    one Inductor's fused pass and the eager unpack write, bit for bit, for several groups and shapes
    (including 128-row blocks and K a multiple of the group only)."""
    monkeypatch.setattr(FP, "COMPILE_MIN_WEIGHTS", 0)
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None, "a C compiler is here but the kernel did not build"
    g = torch.Generator().manual_seed(11)
    for n, k, group in ((192, 128, 32), (128, 320, 64), (64, 256, 128)):
        w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
        t = int4_opaque_from_codes(rtn.rtn_codes(w, 4, group, False), dtype)
        with_c, compiled, eager = _dense_three_ways(t, dtype, monkeypatch)
        s, z = (t.scale_and_zero[..., i].to(torch.float32).contiguous() for i in (0, 1))
        direct = torch.empty(k, n, dtype=dtype)
        assert cpu_kernels.int4_dequant_t(direct, t.qdata, s, z, n, k, group)
        assert torch.equal(with_c, direct.t()) and torch.equal(with_c, compiled) and torch.equal(with_c, eager), (n, k, group)
    assert FP._FAILED == set()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="the C kernels need a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_awq_prescale_folded_into_the_int4_weight_at_prefill(dtype, monkeypatch):
    """At prefill shapes AWQ's activation pre-scale is folded into the dequantized int4 weight by the
    C kernel (no pass over the activations): the same function as scaling the activations, to the
    dtype's rounding, and exactly x·diag(pre)·Wᵀ in fp32 arithmetic of the weight."""
    monkeypatch.setattr(FP, "COMPILE_MIN_WEIGHTS", 0)
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cpu_kernels.library.cache_clear()
    g = torch.Generator().manual_seed(12)
    w = torch.randn(128, 192, generator=g)
    pre = torch.rand(192, generator=g) + 0.5
    t = int4_opaque_from_codes(rtn.rtn_codes(w / pre, 4, 64, False), dtype)
    t.act_pre_scale = pre
    calls, real = [], cpu_kernels.int4_dequant_t

    def spy(*args):
        calls.append(args[7] if len(args) > 7 else None)  # the pre-scale handed to the kernel
        return real(*args)

    monkeypatch.setattr(cpu_kernels, "int4_dequant_t", spy)
    x = torch.randn(3, 20, 192, generator=g).to(dtype)
    with torch.no_grad():
        y = FP.linear(x, t)
    assert calls and calls[-1] is not None, "the folded path did not run"
    with torch.no_grad():
        scaled = FP.forward(x * pre.to(dtype), t)  # the activations scaled, then the plain int4 linear
    wd = FP.dense(t, torch.float32).double() * pre.double()  # x·diag(pre)·Wᵀ
    ref = x.double() @ wd.T
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert (y.double() - ref).abs().max() / ref.abs().max() <= tol
    assert (y.double() - scaled.double()).abs().max() / ref.abs().max() <= 2 * tol


def _kernel_builds():
    """The native build and the plain-C one (no AVX-512): both arithmetic paths of lowbit_gemv.c."""
    cpu_kernels.library.cache_clear()
    libs = [cpu_kernels.library(), cpu_kernels.library(("-mno-avx512f",))]
    assert all(lib is not None for lib in libs), "a C compiler is here but the kernels did not build"
    return libs


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="the C kernels need a C compiler")
def test_int4_gemv_kernel_equals_torchs_own_int4_dequantization(monkeypatch):
    """fp32 decode on torch's int4 layout (csrc/lowbit_gemv.c) against x·Wᵀ with W from aten's own
    int4 kernel applied to the identity (an independent reading of the layout), every row count a
    decode can have, several groups and block counts; the model's fp32 decode uses it."""
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    libs = _kernel_builds()
    g = torch.Generator().manual_seed(21)
    for n, k, group in ((192, 128, 32), (128, 320, 64), (64, 256, 128), (576, 576, 64)):
        w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
        t = int4_opaque_from_codes(rtn.rtn_codes(w, 4, group, False), torch.float32)
        ref_w = _int4_kernel_dense(t).double()
        s, z = (t.scale_and_zero[..., i].to(torch.float32).contiguous() for i in (0, 1))
        for rows in (1, 2, 5, 8):
            x = torch.randn(rows, k, generator=g)
            ref = x.double() @ ref_w.T
            for lib in libs:
                y = cpu_kernels.int4_gemv(x, t.qdata, s, z, n, k, group, lib=lib)
                assert y is not None and y.shape == (rows, n)
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (n, k, group, rows, err)
        with torch.no_grad():
            assert FP.decode_kernel(t, torch.float32) is FP.CANDIDATES["Int4OpaqueTensor"][
                "int4 gemv (C, fp32 activations)"]
            y = F.linear(x[:1], t)
        assert (y.double() - x[:1].double() @ ref_w.T).abs().max() < 1e-5 * (x[:1].double() @ ref_w.T).abs().max()
    assert cpu_kernels.int4_gemv(torch.randn(1, 130), t.qdata, s, z, n, k, group) is None  # wrong K: refused


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="the C kernels need a C compiler")
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
def test_nf4_gemv_kernel_equals_bitsandbytes_dequantization(nested, monkeypatch):
    """NF4 decode read from the codes where they lie (no repack) against x·Wᵀ with W from
    bitsandbytes' own dequantize_4bit, for double-quantized and plain absmax and two block sizes."""
    import bitsandbytes.functional as bnbf

    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    libs = _kernel_builds()
    g = torch.Generator().manual_seed(22)
    for n, k, bs in ((192, 128, 64), (96, 512, 128), (576, 1536, 64)):
        w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
        packed, state = bnbf.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type="nf4")
        ref_w = bnbf.dequantize_4bit(packed, state).double()
        before = packed.clone()
        for rows in (1, 3, 8):
            x = torch.randn(rows, k, generator=g)
            ref = x.double() @ ref_w.T
            for lib in libs:
                y = cpu_kernels.nf4_gemv(x, packed, state, lib=lib)
                assert y is not None and y.shape == (rows, n)
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (n, k, bs, rows, err)
        assert torch.equal(packed, before)
    fp4_packed, fp4_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert cpu_kernels.nf4_gemv(x, fp4_packed, fp4_state) is None  # another table: refused, not misread


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="the C kernels need a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_c_kernel_is_bit_equal_to_the_compiled_and_eager_passes(dtype, monkeypatch):
    """csrc/packed_dequant.c reads both `pack_bits` layouts (codes per byte for 1/2/4/8 bits,
    bit-planes otherwise); its dense weight is the compiled pass's and the eager unpack's, bit for
    bit, symmetric and asymmetric, and equals the codes' own dequantization to the dtype's rounding."""
    monkeypatch.setattr(FP, "COMPILE_MIN_WEIGHTS", 0)
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    cpu_kernels.library.cache_clear()
    assert cpu_kernels.library() is not None, "a C compiler is here but the kernel did not build"
    g = torch.Generator().manual_seed(13)
    calls, real = [], cpu_kernels.packed_dequant
    plain_lib = cpu_kernels.library(("-mno-avx512f",))

    def spy(*a):
        ok = real(*a)
        if ok:
            calls.append(a[4])  # the bits the kernel ran with
        return ok

    monkeypatch.setattr(cpu_kernels, "packed_dequant", spy)
    for bits, group, sym, k in ((3, 64, False, 256), (2, 32, False, 288), (5, 32, True, 288), (8, 64, False, 256),
                                (6, 96, True, 288), (1, 32, False, 256)):  # K = 288: a tail after 64-code blocks
        w = torch.randn(96, k, generator=g) * torch.rand(96, 1, generator=g)
        c = rtn.rtn_codes(w, bits, group, sym)
        t = PackedIntxTensor.from_codes(c, dtype)
        with_c, compiled, eager = _dense_three_ways(t, dtype, monkeypatch)
        assert torch.equal(with_c, compiled) and torch.equal(with_c, eager), (bits, group, sym)
        plain = torch.empty_like(with_c)  # the plain-C loops (no AVX-512) compute the same
        zero = None if t.zero_point is None else t.zero_point.float().contiguous()
        assert real(plain, t.qdata, t.scale.float().contiguous(), zero, bits, group, lib=plain_lib)
        assert torch.equal(plain, with_c), (bits, group, sym)
        ref = c.dequantize().to(dtype)  # the codes' own (q - zero) * scale
        assert (with_c.float() - ref.float()).abs().max() <= TOL[dtype] * ref.abs().max(), (bits, group, sym)
    assert calls == [3, 2, 5, 8, 6, 1] and FP._FAILED == set()
