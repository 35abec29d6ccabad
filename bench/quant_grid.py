"""Accuracy of frontier's integer grids against independent references (no timing).

    PYTHONPATH=src python bench/quant_grid.py --out bench/results/quant_grid.json [--label after]

* one_sign_group: a 128-wide group with values evenly in [1.0, 5.6], 4-bit asymmetric RTN:
  max |w - ŵ| of frontier's `rtn_codes` and of torchao's `choose_qparams_affine`
  (MappingType.ASYMMETRIC) + `quantize_affine` + `dequantize_affine`.
* gptq: held-out output error ||X W^T - X Ŵ^T|| / ||X W^T|| of frontier's `gptq_codes` divided
  by that of GPTQ as published (tests/gptq_paper.py, Algorithm 1 written from the paper), and
  of RTN divided by the paper's, on 4- and 3-bit g128 asymmetric, for random rows, rows shifted
  to one sign, and a few outlier input columns. Calibration and held-out inputs: correlated,
  unevenly scaled channels, different seeds.

Each run appends its numbers under --label (e.g. `before` on the parent commit, `after`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from torchao.quantization.quant_primitives import (  # noqa: E402
    MappingType, choose_qparams_affine, dequantize_affine, quantize_affine)

from frontier.quantize import calibrated, rtn  # noqa: E402
from gptq_paper import gptq_paper  # noqa: E402


def inputs(k: int, n: int, seed: int, mix_seed: int = 1) -> torch.Tensor:
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(mix_seed)) * torch.linspace(0.1, 2.0, k)
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) @ mix


def weights(kind: str, n: int = 128, k: int = 256) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    if kind == "one_sign":  # every row shifted to [1, ~7]
        w = w - w.amin(1, keepdim=True) + 1.0
    elif kind == "outlier_columns":
        w[:, torch.randperm(k, generator=torch.Generator().manual_seed(5))[:4]] *= 10.0
    return w


def out_err(w, wq, x) -> float:
    ref = x.double() @ w.double().T
    return float((ref - x.double() @ wq.double().T).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/quant_grid.json")
    ap.add_argument("--label", default="after")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict = {}
    g = torch.linspace(1.0, 5.6, 128).unsqueeze(0)
    mine = rtn.rtn_codes(g, 4, 128, False).dequantize()
    s, z = choose_qparams_affine(g, MappingType.ASYMMETRIC, (1, 128), torch.uint8, 0, 15)
    ao = dequantize_affine(quantize_affine(g, (1, 128), s, z, torch.uint8, 0, 15), (1, 128), s, z, torch.uint8, 0, 15)
    res["one_sign_group"] = {"frontier_max_err": round(float((mine - g).abs().max()), 4),
                             "torchao_max_err": round(float((ao - g).abs().max()), 4)}
    x_cal, x_held = inputs(256, 2048, 2), inputs(256, 2048, 3)
    h = 2 * x_cal.T @ x_cal / x_cal.shape[0]
    res["gptq"] = {}
    for bits in (4, 3):
        for kind in ("random", "one_sign", "outlier_columns"):
            w = weights(kind)
            paper = out_err(w, gptq_paper(w, x_cal, bits, 128), x_held)
            ours = out_err(w, calibrated.gptq_codes(w, h, bits, 128, False).dequantize(), x_held)
            r = out_err(w, rtn.rtn_codes(w, bits, 128, False).dequantize(), x_held)
            res["gptq"][f"{bits}bit_g128_{kind}"] = {
                "paper_err": round(paper, 5), "frontier_err": round(ours, 5), "rtn_err": round(r, 5),
                "frontier_over_paper": round(ours / paper, 4), "rtn_over_paper": round(r / paper, 4)}
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["machine"] = {"python": platform.python_version(), "torch": torch.__version__}
    data[args.label] = res
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
