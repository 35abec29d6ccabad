"""KIVI: a 2/4-bit KV cache (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache"), as a transformers cache layer that holds real packed low-bit codes.

The recipe (the paper's Algorithm 1, and its reference code):

* **Keys per channel**, grouped along the token axis: every ``group`` consecutive tokens of one
  channel share a scale and a zero point (min-max, asymmetric). Keys are quantized in blocks of
  ``residual`` tokens: new keys wait in a full-precision residual; when it holds ``residual``
  tokens (``group`` when ``residual`` is 0) the whole block is quantized and the residual is
  emptied. The residual therefore holds ``L mod residual`` keys.
* **Values per token**, grouped along the channel axis: every ``group`` consecutive channels of
  one token share a scale and a zero point. The ``residual`` most recent values stay in full
  precision; each older value is quantized as it leaves that window.
* Flushes happen *after* the tokens of an ``update`` were returned for attention: a decode step
  attends to the packed past, the residual and its own key/value in full precision (KIVI's
  decode), and a prefill attends in full precision to the tokens it brings (KIVI's prefill). Which
  tokens are quantized, and how, depends only on their positions, never on how the stream was cut
  into ``update`` calls: a prompt prefilled at once and the same tokens fed one at a time leave the
  same codes, scales and residuals.

Storage (per layer; ``B`` batch, ``H`` KV heads, ``D`` head_dim, ``per = 8 // bits`` codes per
byte; ``uint8`` codes, float16 scales and zero points as in KIVI's kernels, residuals in the
model dtype):

* keys: ``key_codes`` [B, H, Nk/per, D] — within each group of ``group`` tokens, byte row r holds
  the codes of tokens r, r + group/per, r + 2·group/per, ... (bit-planes along the token axis, so
  unpacking is a shift over contiguous rows); ``key_scale`` / ``key_zero`` [B, H, Nk/group, D];
* values: ``value_codes`` [B, H, ceil(Nv/per), D] — byte row r holds the codes of tokens
  per·r .. per·r + per - 1 (bit-planes over blocks of ``per`` tokens; values arrive one token at a
  time, so the last row may be partly filled); ``value_scale`` / ``value_zero`` [B, H, Nv, D/group];
* ``keys`` / ``values``: the full-precision residuals [B, H, r, D] (transformers' own
  ``QuantizedLayer`` keeps its residual there too).

``update`` dequantizes the packed blocks into contiguous [B, H, T, D] keys and values for
attention and keeps no dense copy of them: decode reads the packed cache and the residual only.
Keys and values each take one pass (unpack, convert, affine in float32, rounded once): the C
kernel of :mod:`frontier.cpu_kernels` where a C compiler is, else a compiled pass (torch.compile;
above ``COMPILE_MIN_CODES`` packed bytes), else eager passes; all three compute the same values
(tests compare them bit for bit). A `KiviCache` gives its layers one
shared :class:`~frontier.cache_layer.DequantWorkspace` for those tensors (one layer's worth,
overwritten by the next layer), because fresh multi-megabyte tensors per layer and step cost more
in page faults than the dequantization itself on CPU (bench/kvcache.py measures decode against the
16-bit cache). KIVI fuses dequantization into the attention matmuls on GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
from transformers.cache_utils import DynamicLayer

from . import cpu_kernels
from .cache_layer import DequantWorkspace, TensorMapLayerMixin, scratch

KIVI_BITS = (2, 4)
Scratch = Callable[[str, int, torch.dtype], torch.Tensor]  # (role, numel, dtype) -> a flat buffer
SCALE_DTYPE = torch.float16  # KIVI keeps scales and zero points (its "mn") in fp16


# ------------------------------------------------------------------ packing
def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) into bytes along ``dim`` (size n, a multiple of 8 // bits):
    byte i holds the codes at i, i + n/per, i + 2n/per, ... in bits 0.., bits.., ... (bit-planes)."""
    per = 8 // bits
    dim = dim % codes.dim()
    n = codes.shape[dim]
    if n % per:
        raise ValueError(f"pack_codes: size {n} along dim {dim} is not a multiple of {per}")
    planes = codes.unflatten(dim, (per, n // per))  # [..., per, n/per, ...]
    shape = [1] * planes.dim()
    shape[dim] = per
    shifted = planes << _shifts(bits, codes.device).view(shape)
    return shifted.sum(dim=dim, dtype=torch.uint8)  # disjoint bits: the sum is a bitwise or


def unpack_codes(packed: torch.Tensor, bits: int, dim: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes, ``dim`` grown by 8 // bits (written into ``out``,
    a contiguous uint8 tensor of the result's size, when given: two passes, no allocation)."""
    per = 8 // bits
    dim = dim % packed.dim()
    shape = [1] * (packed.dim() + 1)
    shape[dim] = per
    planes_shape = list(packed.shape)
    planes_shape.insert(dim, per)
    planes = (torch.empty(planes_shape, dtype=torch.uint8, device=packed.device) if out is None
              else out.view(planes_shape))
    torch.bitwise_right_shift(packed.unsqueeze(dim), _shifts(bits, packed.device).view(shape), out=planes)
    planes.bitwise_and_((1 << bits) - 1)
    return planes.flatten(dim, dim + 1)


# ------------------------------------------------------------------ fused passes (torch.compile)
COMPILE_ENV = "FRONTIER_QUANT_COMPILE"  # 0: eager only (shared with frontier.quantize.fastpath)
COMPILE_MIN_CODES = 1 << 16  # fewer packed code bytes (tests, short contexts): eager, nothing compiled
_FAILED: set = set()


def _keys_fused(out, codes, scale, zero, shifts, mask: int):
    """out [B, H, G, per, group/per, D] = code x scale + zero from codes [B, H, G, group/per, D] and
    scale/zero [B, H, G, D]: unpack, convert and affine in one pass, computed in float32."""
    c = ((codes.unsqueeze(3) >> shifts) & mask).to(torch.float32)
    s = scale.unsqueeze(3).unsqueeze(3).to(torch.float32)
    z = zero.unsqueeze(3).unsqueeze(3).to(torch.float32)
    out.copy_(c * s + z)


def _values_fused(out, codes, scale, zero, shifts, mask: int):
    """out [B, H, rows, per, G, group] = code x scale + zero from codes [B, H, rows, 1, G, group] and
    scale/zero [B, H, rows, per, G, 1], in one pass computed in float32 (the shapes are made by the
    caller: views inside a dynamic-shape kernel cost Inductor its vectorisation here)."""
    c = ((codes >> shifts) & mask).to(torch.float32)
    out.copy_(c * scale.to(torch.float32) + zero.to(torch.float32))


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    """Inductor kernel of one of the fused passes; dynamic shapes (the cache grows every step)."""
    return torch.compile(globals()[name], dynamic=True)


def _run_fused(name: str, n_codes: int, *args) -> bool:
    """Run a fused pass if compiling is on and worth it; False (caller goes eager) otherwise or when
    compiling fails (no C++ compiler...: eager from then on)."""
    if (name in _FAILED or n_codes < COMPILE_MIN_CODES or args[0].device.type != "cpu"
            or os.environ.get(COMPILE_ENV, "1").lower() in ("0", "false", "no")):
        return False
    try:
        _compiled(name)(*args)
        return True
    except Exception:  # noqa: BLE001 - eager from here on
        _FAILED.add(name)
        return False


# ------------------------------------------------------------------ quantization (min-max, asymmetric)
def _minmax(x: torch.Tensor, dim: int, bits: int):
    """fp16 (scale, zero) of min-max asymmetric quantization over ``dim`` (kept), and the codes."""
    x = x.float()
    mn, mx = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((mx - mn) / qmax).to(SCALE_DTYPE)
    zero = mn.to(SCALE_DTYPE)
    s = scale.float()
    codes = torch.round((x - zero.float()) / torch.where(s > 0, s, torch.ones_like(s))).clamp_(0, qmax)
    return codes.to(torch.uint8), scale, zero


def quantize_keys(k: torch.Tensor, bits: int, group: int):
    """Keys [B, H, n, D] (n a multiple of ``group``) → (codes [B, H, n/per, D], scale, zero
    [B, H, n/group, D]): per channel, one scale/zero per group of ``group`` tokens."""
    b, h, n, d = k.shape
    codes, scale, zero = _minmax(k.reshape(b, h, n // group, group, d), 3, bits)
    packed = pack_codes(codes, bits, dim=3)  # [B, H, n/group, group/per, D]
    return packed.flatten(2, 3), scale.squeeze(3), zero.squeeze(3)


def quantize_values(v: torch.Tensor, bits: int, group: int):
    """Values [B, H, n, D] → (unpacked uint8 codes [B, H, n, D], scale, zero [B, H, n, D/group]): per
    token, one scale/zero per group of ``group`` channels. :func:`append_value_codes` packs them."""
    b, h, n, d = v.shape
    codes, scale, zero = _minmax(v.reshape(b, h, n, d // group, group), 4, bits)
    return codes.reshape(b, h, n, d), scale.squeeze(4), zero.squeeze(4)


def append_value_codes(packed: torch.Tensor, n: int, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed value codes [B, H, ceil(n / per), D] holding tokens 0..n-1, with ``codes`` [B, H, m, D]
    (tokens n..n+m-1) added: byte row r holds tokens per·r .. per·r + per - 1 in its bit-planes
    (blocks of ``per`` consecutive tokens, so unpacking writes whole token rows). A partly filled
    last row is completed first; a new partial row is zero-padded."""
    per = 8 // bits
    b, h, m, d = codes.shape
    k = n % per
    if k:  # complete the last row: tokens n.. go to planes k..
        take = min(per - k, m)
        head = codes[:, :, :take] << _shifts(bits, codes.device)[k:k + take].view(take, 1)
        last = packed[:, :, -1:] | head.sum(2, keepdim=True, dtype=torch.uint8)
        packed = torch.cat([packed[:, :, :-1], last], 2)
        codes = codes[:, :, take:]
    if codes.shape[2]:
        pad = -codes.shape[2] % per
        if pad:
            codes = torch.cat([codes, codes.new_zeros(b, h, pad, d)], 2)
        rows = pack_codes(codes.unflatten(2, (-1, per)), bits, dim=3).squeeze(3)  # [B, H, m/per, D]
        packed = torch.cat([packed, rows], 2)
    return packed


def _affine_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 scratch: Optional[Scratch] = None) -> None:
    """out = codes * scale + zero computed in float32 and rounded once to ``out``'s dtype (as the
    fused pass does). ``codes`` (uint8) are converted first: addcmul on a uint8 operand takes a
    scalar path (~6x slower in fp32 on CPU)."""
    if out.dtype == torch.float32:
        f = out
    elif scratch is None:
        f = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    else:
        f = scratch("float32", out.numel(), torch.float32).view(out.shape)
    f.copy_(codes)
    torch.addcmul(zero.to(torch.float32), f, scale.to(torch.float32), out=f)
    if f is not out:
        out.copy_(f)


def dequantize_keys(codes, scale, zero, bits: int, group: int, out: Optional[torch.Tensor] = None, dtype=None,
                    scratch: Optional[Scratch] = None):
    """[B, H, n, D] keys from :func:`quantize_keys`' output, written into ``out`` when given (any
    strides over B and H); ``scratch(role, numel, dtype)``: where the eager passes put the codes
    (default: fresh tensors)."""
    b, h, rows, d = codes.shape
    per = 8 // bits
    n = rows * per
    if out is None:
        out = torch.empty(b, h, n, d, dtype=dtype or torch.float32, device=codes.device)
    if n and cpu_kernels.kivi_keys(out, codes, scale, zero, bits, group):
        return out
    grouped = codes.reshape(b, h, n // group, group // per, d)
    if _run_fused("_keys_fused", codes.numel(), out.view(b, h, n // group, per, group // per, d), grouped, scale, zero,
                  _shifts(bits, codes.device).view(per, 1, 1), (1 << bits) - 1):
        return out
    c = unpack_codes(grouped, bits, dim=3, out=None if scratch is None else scratch("codes", grouped.numel() * per,
                                                                                     torch.uint8))
    _affine_into(out.unflatten(2, (n // group, group)), c, scale.unsqueeze(3), zero.unsqueeze(3), scratch)
    return out


def dequantize_values(codes, scale, zero, bits: int, group: int, out: Optional[torch.Tensor] = None, dtype=None,
                      scratch: Optional[Scratch] = None):
    """[B, H, n, D] values (n = ``scale.shape[2]``) from :func:`append_value_codes`' rows, written
    into ``out`` when given, computed in float32 and rounded once. Whole rows go through one
    compiled pass when it applies; the rest (everything when eager, else a part-filled last row)
    through eager passes (``scratch`` as in :func:`dequantize_keys`)."""
    b, h, rows, d = codes.shape
    per = 8 // bits
    n, ng = scale.shape[2], d // group
    if out is None:
        out = torch.empty(b, h, n, d, dtype=dtype or torch.float32, device=codes.device)
    if n and cpu_kernels.kivi_values(out, codes, scale, zero, bits, group):
        return out
    full = n // per
    done = 0
    if full and _run_fused("_values_fused", b * h * full * d, out[:, :, :full * per].view(b, h, full, per, ng, group),
                           codes[:, :, :full].view(b, h, full, 1, ng, group),
                           scale[:, :, :full * per].view(b, h, full, per, ng, 1),
                           zero[:, :, :full * per].view(b, h, full, per, ng, 1),
                           _shifts(bits, codes.device).view(per, 1, 1), (1 << bits) - 1):
        done = full * per
    if done < n:
        r0, m = done // per, n - done
        c = unpack_codes(codes[:, :, r0:].unsqueeze(3), bits, dim=3,
                         out=None if scratch is None else scratch("codes", b * h * (rows - r0) * per * d, torch.uint8))
        c = c.view(b, h, -1, d)[:, :, :m]
        dst = out[:, :, done:]
        if dst.dtype == torch.float32:
            f = dst
        elif scratch is None:
            f = torch.empty(b, h, m, d, dtype=torch.float32, device=codes.device)
        else:
            f = scratch("float32", b * h * m * d, torch.float32).view(b, h, m, d)
        f.copy_(c)
        fg = f.unflatten(3, (ng, group))  # one broadcast operand per pass: both at once take a scalar loop
        fg.mul_(scale[:, :, done:].unsqueeze(4).to(torch.float32))
        fg.add_(zero[:, :, done:].unsqueeze(4).to(torch.float32))
        if f is not dst:
            dst.copy_(f)
    return out


# ------------------------------------------------------------------ the cache layer
class KiviLayer(TensorMapLayerMixin, DynamicLayer):
    """A growing KV cache layer with KIVI 2/4-bit packed keys/values and a full-precision residual."""

    is_croppable = False

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128,
                 workspace: Optional[DequantWorkspace] = None, **kwargs):
        super().__init__()
        self.workspace = workspace  # shared by the cache's layers (KiviCache); None: fresh tensors per step
        if bits not in KIVI_BITS:
            raise ValueError(f"KiviLayer bits must be one of {KIVI_BITS}, got {bits!r}")
        if group < 1 or group % (8 // bits) or residual < 0 or residual % group:
            raise ValueError(f"KiviLayer needs group a multiple of {8 // bits} and residual a multiple of group "
                             f"(got group={group}, residual={residual})")
        self.bits, self.group, self.residual = int(bits), int(group), int(residual)
        self.block = self.residual or self.group  # keys are quantized this many tokens at a time
        self.cumulative_length = 0
        self._clear()

    def _clear(self) -> None:
        self.key_codes = self.key_scale = self.key_zero = None
        self.value_codes = self.value_scale = self.value_zero = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if d % self.group or d % (8 // self.bits):
            raise ValueError(f"KIVI: head_dim {d} must be a multiple of kv_group={self.group} (values are grouped "
                             f"along channels) and of {8 // self.bits}")
        self.device, self.dtype = key_states.device, key_states.dtype
        dev, per = self.device, 8 // self.bits
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.key_codes = torch.empty(b, h, 0, d, dtype=torch.uint8, device=dev)
        self.key_scale = torch.empty(b, h, 0, d, dtype=SCALE_DTYPE, device=dev)
        self.key_zero = torch.empty_like(self.key_scale)
        self.value_codes = torch.empty(b, h, 0, d, dtype=torch.uint8, device=dev)
        self.value_scale = torch.empty(b, h, 0, d // self.group, dtype=SCALE_DTYPE, device=dev)
        self.value_zero = torch.empty_like(self.value_scale)
        self.is_initialized = True

    # -------------------------------------------------------------- sizes
    def quantized_lengths(self) -> tuple[int, int]:
        """(packed keys, packed values) in tokens."""
        if not self.is_initialized:
            return 0, 0
        return self.key_codes.shape[2] * (8 // self.bits), self.value_scale.shape[2]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def state_bytes(self) -> int:
        """Bytes held: packed codes + fp16 scales/zeros + the full-precision residuals."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        return (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale,
                self.value_zero, self.keys, self.values)

    # -------------------------------------------------------------- update
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        nk, nv = self.quantized_lengths()
        res_k = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2) if self.keys.shape[-2] else key_states
        res_v = torch.cat([self.values, value_states.to(self.dtype)], dim=-2) if self.values.shape[-2] else value_states
        grad = torch.is_grad_enabled() and (res_k.requires_grad or res_v.requires_grad)
        keys, values = self._attend_view(res_k, res_v, nk, nv, None if grad else self.workspace)
        self._flush(res_k, res_v)
        return keys, values

    def _attend_view(self, res_k, res_v, nk: int, nv: int, workspace: Optional[DequantWorkspace] = None):
        """The packed past (dequantized) followed by the residual + new tokens, as contiguous
        [B, H, T, D] tensors (SDPA's fused CPU kernel wants head_dim at stride 1, and runs ~1.4x
        faster on contiguous tokens than on token-outer views). With a ``workspace`` they are views
        of its buffers, valid until the next layer's update."""
        if nk == 0 and nv == 0:
            return res_k, res_v

        def flat(role, numel, dtype):
            return scratch(workspace, role, (numel,), dtype, res_k.device)

        b, h, rk, d = res_k.shape
        rv, dv = res_v.shape[-2], res_v.shape[-1]
        kbuf = scratch(workspace, "keys", (b, h, nk + rk, d), res_k.dtype, res_k.device)
        if nk:
            dequantize_keys(self.key_codes, self.key_scale, self.key_zero, self.bits, self.group, out=kbuf[:, :, :nk],
                            scratch=flat)
        kbuf[:, :, nk:].copy_(res_k)
        vbuf = scratch(workspace, "values", (b, h, nv + rv, dv), res_v.dtype, res_v.device)
        if nv:
            dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.bits, self.group,
                              out=vbuf[:, :, :nv],
                              scratch=flat)
        vbuf[:, :, nv:].copy_(res_v)
        return kbuf, vbuf

    def _flush(self, res_k: torch.Tensor, res_v: torch.Tensor) -> None:
        """Quantize whole key blocks of the residual, and every value older than the window."""
        m = (res_k.shape[-2] // self.block) * self.block
        if m:
            c, s, z = quantize_keys(res_k[:, :, :m], self.bits, self.group)
            self.key_codes = torch.cat([self.key_codes, c], dim=2)
            self.key_scale = torch.cat([self.key_scale, s], dim=2)
            self.key_zero = torch.cat([self.key_zero, z], dim=2)
        self.keys = res_k[:, :, m:].clone()  # a copy: a view would keep the whole input alive
        m = max(res_v.shape[-2] - self.residual, 0)
        if m:
            c, s, z = quantize_values(res_v[:, :, :m], self.bits, self.group)
            self.value_codes = append_value_codes(self.value_codes, self.value_scale.shape[2], c, self.bits)
            self.value_scale = torch.cat([self.value_scale, s], dim=2)
            self.value_zero = torch.cat([self.value_zero, z], dim=2)
        self.values = res_v[:, :, m:].clone()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache as it stands ([B, H, L, D] keys and values: packed part dequantized + residual)."""
        nk, nv = self.quantized_lengths()
        return self._attend_view(self.keys, self.values, nk, nv)

    # -------------------------------------------------------------- bookkeeping
    def reset(self) -> None:
        self._clear()
        self.cumulative_length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KiviLayer cannot be cropped (packed blocks; assisted decoding is unsupported)")

    def _map_tensors(self, fn) -> None:  # for TensorMapLayerMixin
        if self.is_initialized:
            (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale,
             self.value_zero, self.keys, self.values) = (fn(t) for t in self._tensors())
