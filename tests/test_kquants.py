"""K-quant encoders: encoded here, decoded by gguf-py (llama.cpp's own decoder), so the layout is checked
bit for bit and the error against the format's own scale."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mlxpost.hub.kquants import quantize_k

T = gguf.GGMLQuantizationType


def weights(rows: int = 64, cols: int = 1024, seed: int = 0) -> np.ndarray:
    """Gaussian weights with a few outlier columns, like a trained linear layer."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    x[:, rng.choice(cols, 8, replace=False)] *= 10
    return x


def rel_rmse(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))


def legacy(x: np.ndarray, kind: str) -> float:
    return rel_rmse(gguf.quants.dequantize(gguf.quants.quantize(x, T[kind]), T[kind]), x)


@pytest.mark.parametrize("kind, nbytes, same_bits, fewer_bits", [
    ("Q4_K", 144, "Q4_1", "Q4_0"), ("Q5_K", 176, "Q5_1", "Q5_0"), ("Q6_K", 210, "Q8_0", "Q5_0")])
def test_round_trip_through_gguf_py_is_within_the_format_error(kind, nbytes, same_bits, fewer_bits):
    """Shape and size are the GGUF block layout; the error beats the legacy type with about as many bits
    (Q4_1 is 5 bits/weight vs Q4_K's 4.5) and is at least 4x below the next coarser type for Q6_K."""
    x = weights()
    q = quantize_k(x, kind)
    assert q.dtype == np.uint8 and q.shape == (64, 1024 // 256 * nbytes)
    y = gguf.quants.dequantize(q, T[kind])
    assert y.shape == x.shape
    err = rel_rmse(y, x)
    if kind == "Q6_K":
        assert legacy(x, "Q8_0") < err < legacy(x, "Q5_0") / 2
    else:
        assert err < legacy(x, same_bits) < legacy(x, fewer_bits)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_exact_grid_values_and_zeros_come_back(kind):
    """Values already on a code grid decode (nearly) exactly; an all-zero block stays zero (no NaN).

    Q6_K's int8 sub-block scales map the signed largest one to -128, so a sub-block whose scale has the
    other sign saturates at 127: 1/128 of a step off, within 1% of the largest weight here."""
    x = np.zeros((2, 256), np.float32)
    levels = 16 if kind == "Q4_K" else 32 if kind == "Q5_K" else 64
    x[1] = (np.arange(256) % levels - (0 if kind != "Q6_K" else 32)) * 0.125
    y = gguf.quants.dequantize(quantize_k(x, kind), T[kind])
    assert np.all(y[0] == 0)
    assert np.abs(y[1] - x[1]).max() < (1e-2 if kind == "Q6_K" else 1e-3) * np.abs(x[1]).max()


def test_every_sub_block_scale_is_used():
    """Sub-blocks of very different sizes each keep their own scale (a packing slip would mix them)."""
    x = weights(4, 256)
    x[:, ::32] = 0
    for j in range(8):  # sub-block j: elements 32j..32j+31, 1.3**j times as large (6-bit scales resolve that)
        x[:, 32 * j:32 * j + 32] *= 1.3 ** j
    for kind in ("Q4_K", "Q5_K"):
        y = gguf.quants.dequantize(quantize_k(x, kind), T[kind])
        for j in range(8):
            s = slice(32 * j, 32 * j + 32)
            assert rel_rmse(y[:, s], x[:, s]) < 0.2, (kind, j)


def test_rows_that_do_not_fill_a_super_block_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(np.zeros((2, 896), np.float32), "Q4_K")
