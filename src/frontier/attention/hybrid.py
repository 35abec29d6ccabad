"""Hybrid models: which layers keep softmax attention.

A hybrid keeps some decoder layers softmax and swaps the rest (``keep_softmax: [0, 5]`` in the
attention config). With ``keep_softmax: auto`` the choice comes from calibration text run through
the *original* (softmax) model, per layer:

* ``entropy``: mean normalised attention entropy ``H_i / log(i + 1)`` over heads and queries
  (``i >= 1``). Low entropy = sharp, retrieval-like attention, the pattern linear attention
  approximates worst; the layer's need score is ``1 - entropy``.
* ``sink_mass``: mean attention probability on the first ``sink_tokens`` tokens (attention sinks,
  Xiao et al. 2023), over heads and queries past the sinks. Linear attention has no sink.
* ``massive``: massive-activation magnitude of the layer's input hidden states (Sun et al. 2024),
  ``max |h| / median |h|``; such outliers drive sinks and are poorly kept by feature maps.

``keep_by`` picks one score, or ``combined`` (default): the mean of the three per-layer ranks
(each score ranked over layers, higher need = higher rank). The ``n_softmax`` layers with the
highest need keep softmax (ties: lower layer index first). Diagnostics and the choice are written
to the surgery manifest and the Parquet row.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["KEEP_BY", "choose_softmax_layers", "layer_diagnostics", "resolve_keep_softmax"]

KEEP_BY = ("combined", "entropy", "sink", "massive")


@torch.no_grad()
def layer_diagnostics(model: nn.Module, input_ids: torch.Tensor, sink_tokens: int = 4, batch: int = 4) -> dict:
    """Per-layer ``entropy``, ``sink_mass``, ``massive`` of a softmax model on ``input_ids`` [N, L].

    Runs the model with eager attention (to read the probabilities) and restores the previous
    implementation afterwards."""
    cfg = model.config
    prev = getattr(cfg, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:  # pragma: no cover - older transformers
        cfg._attn_implementation = "eager"
    n_layers = int(cfg.num_hidden_layers)
    ent = torch.zeros(n_layers, dtype=torch.float64)
    sink = torch.zeros(n_layers, dtype=torch.float64)
    mass = torch.zeros(n_layers, dtype=torch.float64)
    rows = 0
    try:
        for s in range(0, input_ids.shape[0], batch):
            ids = input_ids[s:s + batch]
            out = model(ids, output_attentions=True, output_hidden_states=True, use_cache=False)
            L = ids.shape[1]
            norm = torch.log(torch.arange(1, L + 1, dtype=torch.float64)).clamp(min=1e-12)
            for i, p in enumerate(out.attentions):
                p = p.double()  # [B, H, L, L]
                h = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)  # [B, H, L]
                ent[i] += (h[..., 1:] / norm[1:]).mean(dim=(1, 2)).sum()
                st = min(sink_tokens, L - 1)
                sink[i] += p[..., st:, :st].sum(-1).mean(dim=(1, 2)).sum()
                x = out.hidden_states[i].double().abs().flatten(1)
                mass[i] += (x.amax(1) / x.median(1).values.clamp(min=1e-12)).sum()
            rows += ids.shape[0]
    finally:
        if callable(setter):
            setter(prev or "sdpa")
        else:  # pragma: no cover
            cfg._attn_implementation = prev
        model.train(was_training)
    rows = max(rows, 1)
    return {
        "entropy": [round(float(x) / rows, 6) for x in ent],
        "sink_mass": [round(float(x) / rows, 6) for x in sink],
        "massive": [round(float(x) / rows, 4) for x in mass],
    }


def _ranks(values: list[float]) -> list[float]:
    """Rank 0..n-1 by value (ties share the mean rank)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and math.isclose(values[order[j + 1]], values[order[i]], rel_tol=1e-12, abs_tol=1e-12):
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2
        i = j + 1
    return ranks


def choose_softmax_layers(diag: dict, n: int, keep_by: str = "combined") -> tuple[list[int], list[float]]:
    """The ``n`` layers that most need softmax, sorted, and every layer's need score."""
    if keep_by not in KEEP_BY:
        raise ValueError(f"keep_by must be one of {KEEP_BY}, got {keep_by!r}")
    need = {
        "entropy": [1.0 - e for e in diag["entropy"]],
        "sink": list(diag["sink_mass"]),
        "massive": list(diag["massive"]),
    }
    n_layers = len(need["entropy"])
    if not 1 <= n < n_layers:
        raise ValueError(f"n_softmax must be in [1, {n_layers - 1}] for a {n_layers}-layer model, got {n}")
    if keep_by == "combined":
        ranked = [_ranks(v) for v in need.values()]
        score = [sum(r[i] for r in ranked) / (len(ranked) * max(n_layers - 1, 1)) for i in range(n_layers)]
    else:
        score = need[keep_by]
    order = sorted(range(n_layers), key=lambda i: (-score[i], i))
    return sorted(order[:n]), [round(float(s), 6) for s in score]


def resolve_keep_softmax(model: nn.Module, cfg: dict, calib_ids: torch.Tensor | None) -> tuple[dict, dict | None]:
    """Resolve ``keep_softmax: auto`` on ``model`` (still softmax) from ``calib_ids``.

    Returns ``(spec, diagnostics)``: ``spec`` is ``cfg`` with a concrete layer list; diagnostics
    (per-layer scores, the choice, the rule) or None when the config already lists the layers."""
    if cfg.get("keep_softmax") != "auto":
        return dict(cfg), None
    if calib_ids is None:
        raise ValueError("attention keep_softmax: auto needs calibration text (calib_ids) to choose the layers")
    diag = layer_diagnostics(model, calib_ids, sink_tokens=int(cfg.get("sink_tokens", 4)))
    from frontier.config import softmax_layer_count

    n_keep = softmax_layer_count(cfg, int(model.config.num_hidden_layers))
    keep, score = choose_softmax_layers(diag, n_keep, cfg.get("keep_by", "combined"))
    diag = {**diag, "score": score, "keep_softmax": keep, "keep_by": cfg.get("keep_by", "combined"),
            "calib_shape": list(calib_ids.shape)}
    return {**cfg, "keep_softmax": keep}, diag
