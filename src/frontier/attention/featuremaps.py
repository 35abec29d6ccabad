"""Feature maps phi for causal linear attention, the ones the linear-attention literature compares.

Every map is an ``nn.Module`` subclass of :class:`FeatureMap` with one interface::

    fm.forward_q(x, positions=None)   # x [B, Hq, L, D]  -> [B, Hq, L, F]
    fm.forward_k(x, positions=None)   # x [B, Hkv, L, D] -> [B, Hkv, L, F]
    fm.forward(q, k, positions=None)  # -> (forward_q(q), forward_k(k))
    fm.feature_dim                    # F
    fm.position_dependent             # True: needs ``positions`` (LongTensor [L] or [B, L])
    fm.learned                        # has trainable parameters
    fm.nonnegative                    # every feature >= 0 (False only for ``taylor``)

Queries use per-query-head parameters, keys per-kv-head parameters (GQA: ``Hq`` a multiple of
``Hkv``), so keys are never expanded. Every map guarantees ``phi(q) . phi(k) >= 0`` for every
query/key pair (so the linear-attention normaliser is non-negative), and ``> 0`` generically
(``relu``-based maps can give 0 when all activations of a query or a key are negative; the
kernels' ``eps`` covers that). The output dtype is the input dtype (internal math in fp32 where a
low-precision input would lose too much: softmax, exp). Under ``torch.no_grad`` (inference) maps may
work in place on their own fresh intermediates; they never modify their input.

Maps (``cfg["feature_map"]``; cfg keys and defaults in :data:`FEATURE_MAP_KEYS`):

``elu`` / ``relu``
    ``elu(x W_h) + 1`` / ``relu(x W_h)``, ``W_h: [D, D]`` per head, identity at init
    (``learned_map``, default True), else no parameters. F = D. Bit-for-bit the map of
    :class:`frontier.attention.modules.LinearFeatureMap`, with the same parameter names
    (``q_weight: [Hq, D, D]``, ``k_weight: [Hkv, D, D]``), so existing checkpoints load.
``hedgehog`` (Zhang et al. 2024, "The Hedgehog & the Porcupine"; LoLCATs)
    ``phi(x) = [softmax(x W_h), softmax(-x W_h)]`` (softmax over the f features), ``W_h: [D, f]``
    per head, always learned. Init: identity when ``f == D``; ``f < D``: the first ``f`` columns of
    the identity (a truncated identity: the map sees the first ``f`` coordinates); ``f > D``: the
    identity padded with zero columns (those features start at logit 0). ``f = feature_dim``
    (default ``None`` = head_dim), F = 2f.
``taylor`` (Based, Arora et al. 2024)
    Second-order Taylor expansion of exp: ``phi(x) = [1, x/d'^(1/4), u(x)/(sqrt(2) sqrt(d'))]`` on
    the projection ``x = x_raw P_h`` (``P_h: [D, d']``, ``d' = feature_dim``, default 16), where
    ``u(x)`` is the upper triangle of ``x x^T`` with the off-diagonal entries scaled by sqrt(2), so
    ``phi(x).phi(y) = 1 + t/sqrt(d') + t^2/(2 d')`` with ``t = x.y`` exactly, using
    F = 1 + d' + d'(d'+1)/2 features instead of 1 + d' + d'^2. Features are signed (``nonnegative``
    is False), but every pairwise product is ``1 + s + s^2/2 = ((1 + s)^2 + 1)/2 >= 1/2``, so the
    normaliser is strictly positive. Init: ``P_h = c * I[:, :d']`` (the first d' columns of the
    identity, zero-padded when d' > D) with ``c = (d'/D)^(1/4)``, so that at init
    ``t / sqrt(d') = q_{:d'} . k_{:d'} / sqrt(D)``: the Taylor variable is the model's own softmax
    logit restricted to the kept coordinates (exactly the logit when d' >= D).
    ``learned_map`` (default True): False keeps that init projection fixed (a non-persistent
    buffer, no parameters).
``performer`` (FAVOR+, Choromanski et al. 2021)
    Positive orthogonal random features ``phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m)`` with
    ``x' = x * sqrt(scale)``, so ``E[phi(x).phi(y)] = exp(scale * x.y)`` (softmax's kernel; ``scale``
    is the layer's logit scale, ``1/sqrt(D)`` unless the family sets another).
    ``omega: [m, D]`` (``m = feature_dim``, default 64), shared by all heads, blocks of D orthogonal
    Gaussian directions with chi-distributed norms, stored as a persistent buffer (a checkpoint
    reproduces it), drawn from a CPU generator seeded by ``seed`` (default 0), so all ranks draw the
    same features. ``redraw(generator=None)`` draws new features (the module's own generator, which
    continues the seeded stream, when none is given). ``redraw_interval`` N > 0: in training mode
    every N-th ``forward_k`` call redraws *after* computing its features (see :meth:`PerformerFeatureMap.step`
    for when to drive this by hand instead). Stabilisers: the query side subtracts its per-row max
    of ``w^T x'`` and drops ``|x'|^2/2`` (``stabilize``, default True): that multiplies all scores of
    one query row by one constant, which cancels in the normalisation (up to the kernels' eps). Keys
    use no data-dependent stabiliser (prefill == cached decode); their exponent is only clamped
    elementwise at ``min(60, 0.75 log(max of dtype))`` (60 in fp32/bf16, ~8.3 in fp16), far
    outside the typical range, so sums over long contexts cannot overflow. Keys with very large
    ``|x'|`` underflow to ~0 features (a known FAVOR+ limitation). ``learned_map`` (default False):
    a learned per-head ``[D, D]`` pre-projection (``q_weight``/``k_weight``) initialised to identity.
``cosformer`` (Qin et al. 2022)
    ``phi(x_i) = [relu(x_i W) cos(pi i / 2M), relu(x_i W) sin(pi i / 2M)]`` for a token at absolute
    position ``i``, so ``phi(q_i).phi(k_j) = relu(q_i W).relu(k_j W) cos(pi (i - j) / 2M)``: the
    cos re-weighting that decays with distance. ``M = max_len`` (default 8192, fixed rather than
    the paper's per-batch sequence length, so prefill and decode agree); positions must lie in
    ``[0, M)`` (ValueError otherwise; this check syncs with the device once per call) and are
    required. ``W`` per head, identity at init, when ``learned_map`` (default True). F = 2D.
    Position-dependent: it cannot be fused into :func:`frontier.attention.kernels.linear_attention_chunked`
    through ``q_map``/``k_map`` (those get segment slices without positions); compute the features
    first and pass them as q/k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FEATURE_MAP_KEYS",
    "FEATURE_MAP_NAMES",
    "CosformerFeatureMap",
    "ElementwiseFeatureMap",
    "FeatureMap",
    "HedgehogFeatureMap",
    "PerformerFeatureMap",
    "TaylorFeatureMap",
    "make_feature_map",
    "orthogonal_gaussian",
    "validate_feature_map_cfg",
]

#: per feature map: the cfg keys it accepts, with their defaults (``None`` for hedgehog's
#: ``feature_dim`` means head_dim). ``feature_map`` itself defaults to ``"elu"``.
FEATURE_MAP_KEYS: dict[str, dict] = {
    "elu": {"learned_map": True},
    "relu": {"learned_map": True},
    "hedgehog": {"feature_dim": None, "learned_map": True},
    "taylor": {"feature_dim": 16, "learned_map": True},
    "performer": {"feature_dim": 64, "seed": 0, "redraw_interval": 0, "learned_map": False, "stabilize": True},
    "cosformer": {"max_len": 8192, "learned_map": True},
}
FEATURE_MAP_NAMES = tuple(FEATURE_MAP_KEYS)
_ALL_KEYS = sorted({k for keys in FEATURE_MAP_KEYS.values() for k in keys})


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or null" if allow_none else ""
        raise ValueError(f"feature map cfg {name!r} must be an int >= {minimum}{extra}, got {value!r}")
    return value


def _check_bool(name: str, value, allowed: tuple = (True, False)) -> bool:
    if not isinstance(value, bool) or value not in allowed:
        raise ValueError(f"feature map cfg {name!r} must be one of {list(allowed)}, got {value!r}")
    return value


def validate_feature_map_cfg(cfg: dict) -> dict:
    """Check the feature-map keys of an (attention) cfg and fill their defaults.

    Returns a copy of ``cfg`` with ``feature_map`` (default ``"elu"``) and every key of that map in
    :data:`FEATURE_MAP_KEYS` set; keys that belong to no feature map (``kind``, ``chunk_size``,
    ``window``, ...) pass through untouched. A feature-map key the chosen map does not use (e.g.
    ``seed`` with ``elu``) is an error unless its value is None. Raises ValueError naming the key
    and its allowed values.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"feature map cfg must be a dict, got {type(cfg).__name__}")
    out = dict(cfg)
    name = out.get("feature_map", "elu")
    if name is None:
        name = "elu"
    if name not in FEATURE_MAP_KEYS:
        raise ValueError(f"feature map cfg 'feature_map' must be one of {list(FEATURE_MAP_NAMES)}, got {name!r}")
    out["feature_map"] = name
    keys = FEATURE_MAP_KEYS[name]
    for k in _ALL_KEYS:
        if k not in keys and out.get(k) is not None:
            raise ValueError(
                f"feature map cfg {k!r} is not used by feature_map {name!r} (its keys: {sorted(keys)}); "
                f"remove it or set it to null"
            )
    for k, default in keys.items():
        if out.get(k) is None:
            out[k] = default
    if "learned_map" in keys:
        allowed = (True,) if name == "hedgehog" else (True, False)
        out["learned_map"] = _check_bool("learned_map", out["learned_map"], allowed)
    if name == "hedgehog":
        _check_int("feature_dim", out["feature_dim"], 1, allow_none=True)
    elif name in ("taylor", "performer"):
        _check_int("feature_dim", out["feature_dim"], 1)
    if name == "performer":
        _check_int("seed", out["seed"], 0)
        _check_int("redraw_interval", out["redraw_interval"], 0)
        _check_bool("stabilize", out["stabilize"])
    if name == "cosformer":
        _check_int("max_len", out["max_len"], 1)
    return out


def make_feature_map(
    cfg: dict,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype | None = None,
    device=None,
    scale: float | None = None,
) -> FeatureMap:
    """Build the feature map named by ``cfg["feature_map"]`` (validated, defaults filled).
    ``scale``: the softmax logit scale the Taylor/Performer maps approximate (default head_dim**-0.5;
    Gemma's query_pre_attn_scalar and Granite's attention_multiplier differ)."""
    c = validate_feature_map_cfg(cfg)
    head_dim, num_heads, num_kv_heads = int(head_dim), int(num_heads), int(num_kv_heads)
    if head_dim < 1 or num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"need head_dim >= 1 and num_heads ({num_heads}) a multiple of num_kv_heads ({num_kv_heads})"
        )
    name = c["feature_map"]
    common = dict(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=dtype, device=device)
    if name in ("elu", "relu"):
        return ElementwiseFeatureMap(name, learned=c["learned_map"], **common)
    if name == "hedgehog":
        return HedgehogFeatureMap(feature_dim=c["feature_dim"], **common)
    if name == "taylor":
        return TaylorFeatureMap(feature_dim=c["feature_dim"], learned=c["learned_map"], scale=scale, **common)
    if name == "performer":
        return PerformerFeatureMap(
            num_features=c["feature_dim"],
            seed=c["seed"],
            redraw_interval=c["redraw_interval"],
            learned=c["learned_map"],
            stabilize=c["stabilize"],
            scale=scale,
            **common,
        )
    return CosformerFeatureMap(max_len=c["max_len"], learned=c["learned_map"], **common)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_dtype(dtype: torch.dtype | None) -> torch.dtype:
    return torch.get_default_dtype() if dtype is None else dtype


def _inference(t: torch.Tensor) -> bool:
    """True when ``t`` needs no autograd graph (so fresh intermediates may be overwritten)."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def _project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-head ``x_h W_h``: x ``[B, H, L, D]``, w ``[H, D, E]`` -> ``[B, H, L, E]`` (a fresh tensor)."""
    if x.dim() != 4 or x.shape[1] != w.shape[0] or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"feature map input must be [B, {w.shape[0]}, L, {w.shape[1]}] for this side, got {tuple(x.shape)}"
        )
    return torch.einsum("bhld,hde->bhle", x, w.to(x.dtype))


def _eye_init(rows: int, cols: int, num_heads: int, scale: float = 1.0, dtype=None, device=None) -> torch.Tensor:
    """``[num_heads, rows, cols]`` copies of the (truncated or zero-padded) identity times ``scale``."""
    eye = torch.eye(rows, cols, dtype=_param_dtype(dtype), device=device) * scale
    return eye.expand(num_heads, rows, cols).clone()


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[m, d]`` float64 orthogonal random features (Choromanski et al. 2021): blocks of ``d``
    Haar-orthonormal rows, each row rescaled by the norm of an independent ``N(0, I_d)`` vector, so
    every row is marginally ``N(0, I_d)`` and rows within a block are exactly orthogonal. Drawn on CPU."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)  # Haar-uniform
        blocks.append(q.T)
    w = torch.cat(blocks, dim=0)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


def _positions_angle(positions, x: torch.Tensor, max_len: int, acc: torch.dtype) -> torch.Tensor:
    """``pi * i / (2 M)`` broadcastable to x ``[B, H, L, *]``: ``[1|B, 1, L, 1]``."""
    if positions is None:
        raise ValueError("this feature map is position dependent: pass positions ([L] or [B, L] token positions)")
    p = torch.as_tensor(positions, device=x.device)
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got {p.dtype}")
    B, _, L, _ = x.shape
    if p.dim() == 1:
        p = p[None]
    if p.dim() != 2 or p.shape[-1] != L or p.shape[0] not in (1, B):
        raise ValueError(f"positions must be [L] or [B, L] with L={L}, B={B}; got shape {tuple(p.shape)}")
    if p.numel():
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= max_len:
            raise ValueError(
                f"positions must lie in [0, max_len={max_len}) for the cosformer feature map, got "
                f"[{lo}, {hi}]; raise the feature map cfg 'max_len'"
            )
    return (p.to(acc) * (math.pi / (2 * max_len)))[:, None, :, None]


# ----------------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------------


class FeatureMap(nn.Module):
    """Base class: ``forward_q``/``forward_k`` map raw per-head q/k to features (see module docs)."""

    kind: str = "base"
    position_dependent: bool = False
    nonnegative: bool = True

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, feature_dim: int, learned: bool):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.head_dim = int(head_dim)
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.feature_dim = int(feature_dim)
        self.learned = bool(learned)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
            f"heads={self.num_heads}/{self.num_kv_heads}, learned={self.learned}"
        )

    def forward_q(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_k(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_q(q, positions), self.forward_k(k, positions)


class ElementwiseFeatureMap(FeatureMap):
    """``elu``: elu(x W_h) + 1, ``relu``: relu(x W_h); W_h ``[D, D]`` identity-init when learned.

    Same computation and parameter names as :class:`frontier.attention.modules.LinearFeatureMap`.
    """

    def __init__(
        self,
        kind: str,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        learned: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        if kind not in ("elu", "relu"):
            raise ValueError(f"unknown elementwise feature map {kind!r}; allowed: ['elu', 'relu']")
        super().__init__(head_dim, num_heads, num_kv_heads, head_dim, learned)
        self.kind = kind
        if self.learned:
            self.q_weight = nn.Parameter(_eye_init(head_dim, head_dim, num_heads, dtype=dtype, device=device))
            self.k_weight = nn.Parameter(_eye_init(head_dim, head_dim, num_kv_heads, dtype=dtype, device=device))

    def _act(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        if self.kind == "elu":
            return F.elu_(x).add_(1.0) if inplace else F.elu(x) + 1.0
        return F.relu_(x) if inplace else F.relu(x)

    def _map(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            return self._act(x, inplace=False)
        x = _project(x, w)
        return self._act(x, inplace=_inference(x))

    def forward_q(self, x, positions=None):
        return self._map(x, self.q_weight if self.learned else None)

    def forward_k(self, x, positions=None):
        return self._map(x, self.k_weight if self.learned else None)


class HedgehogFeatureMap(FeatureMap):
    """``[softmax(x W_h), softmax(-x W_h)]``, W_h ``[D, f]`` learned, identity-init (truncated or
    zero-padded when ``f != D``). F = 2f. Softmax in fp32 for half-precision inputs."""

    kind = "hedgehog"

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        feature_dim: int | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        f = int(head_dim if feature_dim is None else feature_dim)
        super().__init__(head_dim, num_heads, num_kv_heads, 2 * f, True)
        self.proj_dim = f
        self.q_weight = nn.Parameter(_eye_init(head_dim, f, num_heads, dtype=dtype, device=device))
        self.k_weight = nn.Parameter(_eye_init(head_dim, f, num_kv_heads, dtype=dtype, device=device))

    def _map(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        u = _project(x, w)
        sm_dtype = _acc_dtype(u.dtype) if u.dtype in (torch.float16, torch.bfloat16) else None
        pos = torch.softmax(u, dim=-1, dtype=sm_dtype)
        neg = torch.softmax(u.neg_() if _inference(u) else -u, dim=-1, dtype=sm_dtype)
        return torch.cat([pos, neg], dim=-1).to(x.dtype)

    def forward_q(self, x, positions=None):
        return self._map(x, self.q_weight)

    def forward_k(self, x, positions=None):
        return self._map(x, self.k_weight)


class TaylorFeatureMap(FeatureMap):
    """Based's 2nd-order Taylor map on a per-head projection to d' dims:
    ``phi(x).phi(y) = 1 + t/sqrt(d') + t^2/(2 d')``, F = 1 + d' + d'(d'+1)/2 (signed features)."""

    kind = "taylor"
    nonnegative = False

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        feature_dim: int = 16,
        learned: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
        scale: float | None = None,
    ):
        d = int(feature_dim)
        super().__init__(head_dim, num_heads, num_kv_heads, 1 + d + d * (d + 1) // 2, learned)
        self.proj_dim = d
        # t/sqrt(d') = logit scale * q.k at init: c^2/sqrt(d') = scale (c = (d'/D)^(1/4) for scale D^-1/2)
        scale = (d * (head_dim**-0.5 if scale is None else scale) ** 2) ** 0.25
        if self.learned:
            self.q_weight = nn.Parameter(_eye_init(head_dim, d, num_heads, scale, dtype=dtype, device=device))
            self.k_weight = nn.Parameter(_eye_init(head_dim, d, num_kv_heads, scale, dtype=dtype, device=device))
        else:
            self.register_buffer(
                "proj", _eye_init(head_dim, d, 1, scale, dtype=dtype, device=device), persistent=False
            )
        ii, jj = torch.triu_indices(d, d, device=device)
        self.register_buffer("_ii", ii, persistent=False)
        self.register_buffer("_jj", jj, persistent=False)
        self.register_buffer("_diag", ii == jj, persistent=False)

    def _coef(self, x: torch.Tensor) -> torch.Tensor:
        """1/sqrt(2 d') on the diagonal, sqrt(2)/sqrt(2 d') = 1/sqrt(d') off it, in x's dtype."""
        d = self.proj_dim
        coef = torch.full(self._diag.shape, 1.0 / math.sqrt(d), dtype=x.dtype, device=x.device)
        return coef.masked_fill_(self._diag, 1.0 / math.sqrt(2.0 * d))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The Taylor features of already-projected ``x [..., d']``."""
        d = self.proj_dim
        if x.shape[-1] != d:
            raise ValueError(f"taylor features need [..., {d}] inputs, got {tuple(x.shape)}")
        quad = x[..., self._ii] * x[..., self._jj]
        coef = self._coef(x)
        quad = quad.mul_(coef) if _inference(quad) else quad * coef
        return torch.cat([x.new_ones(*x.shape[:-1], 1), x * d**-0.25, quad], dim=-1)

    def _map(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            w = self.proj.expand(x.shape[1], -1, -1)
        return self.features(_project(x, w))

    def forward_q(self, x, positions=None):
        return self._map(x, self.q_weight if self.learned else None)

    def forward_k(self, x, positions=None):
        return self._map(x, self.k_weight if self.learned else None)


class PerformerFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features ``exp(w^T x' - |x'|^2/2) / sqrt(m)``,
    ``x' = x * sqrt(scale)``; ``omega [m, D]`` a persistent buffer shared by all heads. F = m."""

    kind = "performer"

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        num_features: int = 64,
        seed: int = 0,
        redraw_interval: int = 0,
        learned: bool = False,
        stabilize: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
        scale: float | None = None,
    ):
        super().__init__(head_dim, num_heads, num_kv_heads, num_features, learned)
        #: x' = x * sqrt(scale): E[phi(q).phi(k)] = exp(q.k * scale) (scale: head_dim**-0.5 by default)
        self.input_scale = float(head_dim**-0.5 if scale is None else scale) ** 0.5
        self.seed = int(seed)
        self.redraw_interval = int(redraw_interval)
        self.stabilize = bool(stabilize)
        #: False: ``forward_k`` never counts calls; drive redraws with :meth:`step` yourself.
        self.auto_redraw = True
        self.calls = 0
        self.redraws = 0
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        buf_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        omega = orthogonal_gaussian(num_features, head_dim, self._generator)
        self.register_buffer("omega", omega.to(dtype=buf_dtype, device=device), persistent=True)
        if self.learned:
            self.q_weight = nn.Parameter(_eye_init(head_dim, head_dim, num_heads, dtype=dtype, device=device))
            self.k_weight = nn.Parameter(_eye_init(head_dim, head_dim, num_kv_heads, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, redraw_interval={self.redraw_interval}"

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features (``generator``: a CPU generator; default the module's own,
        seeded by ``seed`` at construction and continued by each redraw). The buffer is replaced,
        not written in place, so a graph built with the old features still backpropagates."""
        omega = orthogonal_gaussian(self.feature_dim, self.head_dim, generator or self._generator)
        self.omega = omega.to(dtype=self.omega.dtype, device=self.omega.device)
        self.redraws += 1

    def step(self) -> bool:
        """Count one use and redraw when ``redraw_interval`` divides the count. Returns whether it
        redrew. ``forward_k`` calls this in training mode (after computing its features) unless
        ``auto_redraw`` is False. Set ``auto_redraw = False`` and call ``step()`` once per attention
        forward (or per optimizer step) when one attention call maps keys in several pieces (the
        chunked kernel's ``k_map`` runs once per segment, so an automatic redraw could land
        mid-sequence) or under activation checkpointing (the recomputed forward would count again
        and could see other features than the original)."""
        if self.redraw_interval <= 0:
            return False
        self.calls += 1
        if self.calls % self.redraw_interval == 0:
            self.redraw()
            return True
        return False

    def _exp_cap(self, dtype: torch.dtype) -> float:
        return min(60.0, 0.75 * math.log(torch.finfo(dtype).max))

    def features(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        """phi of (already pre-projected) ``x [..., D]``; ``is_query`` with ``stabilize`` applies the
        per-row query stabiliser (features then equal phi times a per-row constant)."""
        acc = _acc_dtype(x.dtype)
        xs = x.to(acc) * self.input_scale
        u = xs @ self.omega.to(acc).T  # [..., m], fresh
        inplace = _inference(u)
        if is_query and self.stabilize:
            mx = u.detach().amax(dim=-1, keepdim=True)
            u = u.sub_(mx) if inplace else u - mx
        else:
            half_sq = 0.5 * xs.pow(2).sum(-1, keepdim=True)
            cap = self._exp_cap(x.dtype)
            u = u.sub_(half_sq).clamp_(max=cap) if inplace else (u - half_sq).clamp(max=cap)
        phi = u.exp_().mul_(self.feature_dim**-0.5) if inplace else u.exp() * self.feature_dim**-0.5
        return phi.to(x.dtype)

    def forward_q(self, x, positions=None):
        if self.learned:
            x = _project(x, self.q_weight)
        elif x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"feature map input must be [B, H, L, {self.head_dim}], got {tuple(x.shape)}")
        return self.features(x, is_query=True)

    def forward_k(self, x, positions=None):
        if self.learned:
            x = _project(x, self.k_weight)
        elif x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"feature map input must be [B, H, L, {self.head_dim}], got {tuple(x.shape)}")
        out = self.features(x, is_query=False)
        if self.training and self.auto_redraw:
            self.step()
        return out


class CosformerFeatureMap(FeatureMap):
    """``[relu(x_i W) cos(pi i/2M), relu(x_i W) sin(pi i/2M)]`` at absolute position ``i``; F = 2D.
    Requires ``positions`` in ``[0, max_len)``."""

    kind = "cosformer"
    position_dependent = True

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        max_len: int = 8192,
        learned: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__(head_dim, num_heads, num_kv_heads, 2 * head_dim, learned)
        self.max_len = int(max_len)
        if self.max_len < 1:
            raise ValueError(f"cosformer max_len must be >= 1, got {max_len!r}")
        if self.learned:
            self.q_weight = nn.Parameter(_eye_init(head_dim, head_dim, num_heads, dtype=dtype, device=device))
            self.k_weight = nn.Parameter(_eye_init(head_dim, head_dim, num_kv_heads, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}"

    def _map(self, x: torch.Tensor, w: torch.Tensor | None, positions) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"feature map input must be [B, H, L, {self.head_dim}], got {tuple(x.shape)}")
        ang = _positions_angle(positions, x, self.max_len, _acc_dtype(x.dtype))
        if w is None:
            r = F.relu(x)
        else:
            r = _project(x, w)
            r = F.relu_(r) if _inference(r) else F.relu(r)
        cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
        return torch.cat([r * cos, r * sin], dim=-1)

    def forward_q(self, x, positions=None):
        return self._map(x, self.q_weight if self.learned else None, positions)

    def forward_k(self, x, positions=None):
        return self._map(x, self.k_weight if self.learned else None, positions)
