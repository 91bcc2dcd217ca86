"""K-quant encoders (Q4_K, Q5_K, Q6_K) in numpy, in GGUF's block layout.

gguf-py (llama.cpp's Python package) decodes every K-quant but encodes
none, so ``export --quant q4_k_m`` needs these. The layouts are the ones
``gguf.quants.dequantize`` reads (and llama.cpp's ``block_q4_K`` etc.); the
tests encode here and decode with gguf-py, so a layout slip cannot pass.

A K-quant super-block holds 256 weights of one row:

- **Q4_K** (144 bytes, 4.5 bits/weight): fp16 ``d``, fp16 ``dmin``, 12 bytes
  of packed 6-bit scales and mins for 8 sub-blocks of 32, then 128 bytes of
  4-bit codes. Weight = ``d*sc[j]*q - dmin*m[j]``, q in 0..15.
- **Q5_K** (176 bytes, 5.5 bits): as Q4_K plus 32 bytes holding the fifth
  bit of every code (bit j of byte i = sub-block j, position i); q in 0..31.
- **Q6_K** (210 bytes, 6.5625 bits): 128 bytes of low nibbles, 64 bytes of
  high 2-bit pairs, 16 int8 scales (sub-blocks of 16), fp16 ``d``.
  Weight = ``d*sc[j]*(q-32)``, q in 0..63; symmetric, no min.

How the numbers are chosen (our own vectorized take on the approach of
llama.cpp's reference quantizers): for each sub-block, a small grid of
candidate step sizes around ``range/nmax`` is tried; for each, codes are
rounded and the (scale, min) pair is re-fitted by weighted least squares
(weights ``rms(x) + |x|`` for the affine types, ``x**2`` for Q6_K, which
favour the large weights that matter most for a matmul), keeping the
candidate with the smallest weighted error. The per-sub-block scales are
then themselves quantized (6-bit for Q4_K/Q5_K, int8 for Q6_K) against one
fp16 super-block scale, and the codes are rounded again with the scales
as they will be decoded, so the stored codes fit the stored scales.

Work is done ``_CHUNK`` super-blocks at a time so a 100M-weight tensor
never needs more than a few hundred MB of temporaries.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_CHUNK = 8192  # super-blocks per pass: 2M weights, ~8 MB float32 per temporary


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 and back, so later steps use the scale that will be decoded."""
    return x.astype(np.float16).astype(np.float32)


def _fit_affine(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, min) per row of ``x`` (..., n) for codes 0..nmax: x ~ scale*q - min.

    Returns ``scale`` >= 0 and ``min`` >= 0 (the offset subtracted; the
    formats store it unsigned, so a row's lowest represented value is never
    above 0). Grid of ``nstep+1`` inverse steps ``(nmax + rmin + rdelta*s) / range``,
    each refitted by weighted least squares on its rounded codes.

    >>> s, m = _fit_affine(np.array([[0.0, 1.0, 2.0, 3.0]]), 3, -1.0, 0.1, 20)
    >>> np.round(s, 4).tolist(), np.round(m, 4).tolist()
    ([1.0], [0.0])
    """
    w = np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + np.abs(x)
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0.0)
    hi = x.max(axis=-1, keepdims=True)
    rng = hi - lo
    flat = rng[..., 0] <= 0
    rng = np.where(rng > 0, rng, 1.0)
    best_s, best_b = rng[..., 0] / nmax, lo[..., 0]
    q = np.clip(np.rint((x - lo) / rng * nmax), 0, nmax)
    best_err = np.sum(w * (best_s[..., None] * q + lo - x) ** 2, axis=-1)
    sw, sx = w.sum(-1), (w * x).sum(-1)
    for s in range(nstep + 1):
        q = np.clip(np.rint((x - lo) * ((nmax + rmin + rdelta * s) / rng)), 0, nmax)
        wq = w * q
        sl, sl2, slx = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1.0)
        a = (sw * slx - sl * sx) / det
        b = (sl2 * sx - sl * slx) / det
        pos = b > 0  # a positive offset cannot be stored: pin min at 0 and refit the scale alone
        a = np.where(pos, slx / np.where(sl2 > 0, sl2, 1.0), a)
        b = np.where(pos, 0.0, b)
        err = np.sum(w * (a[..., None] * q + b[..., None] - x) ** 2, axis=-1)
        better = ok & (err < best_err) & (a >= 0)
        best_s, best_b, best_err = np.where(better, a, best_s), np.where(better, b, best_b), np.minimum(
            best_err, np.where(better, err, best_err))
    best_s = np.where(flat, 0.0, best_s)
    return best_s.astype(np.float32), (0.0 - best_b).astype(np.float32)


def _pack_scales_mins(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins per super-block (nb, 8) -> the 12-byte field (nb, 12).

    Bytes 0-3: scale j (low 6 bits) with bits 4-5 of scale j+4 on top;
    bytes 4-7: the same for mins; bytes 8-11: low nibbles of scale j+4 and
    (high nibble) min j+4.

    >>> _pack_scales_mins(np.array([[1, 2, 3, 4, 63, 5, 6, 7]]), np.zeros((1, 8), int)).tolist()
    [[193, 2, 3, 4, 0, 0, 0, 0, 15, 5, 6, 7]]
    """
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([b0, b1, b2], axis=1).astype(np.uint8)


def _affine_superblocks(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared Q4_K/Q5_K step: (nb, 256) -> the block's first 16 bytes (fp16 d, fp16 dmin, the 12-byte
    scales-and-mins field) (nb, 16), and the codes (nb, 8, 32)."""
    xs = x.reshape(-1, 8, 32)
    scale, mn = _fit_affine(xs, nmax, rmin, 0.1, nstep)
    d = _f16(scale.max(axis=1, keepdims=True) / 63)
    dmin = _f16(mn.max(axis=1, keepdims=True) / 63)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1.0)), 0, 63)
    m = np.clip(np.rint(mn / np.where(dmin > 0, dmin, 1.0)), 0, 63)
    eff_s, eff_m = (d * sc)[..., None], (dmin * m)[..., None]
    q = np.clip(np.rint((xs + eff_m) / np.where(eff_s > 0, eff_s, 1.0)), 0, nmax)
    q = np.where(eff_s > 0, q, 0).astype(np.uint8)
    head = [d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), _pack_scales_mins(sc, m)]
    return np.concatenate(head, axis=1), q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes (nb, 8, 32) -> 128 bytes: sub-block 2i in the low nibbles of bytes 32i.., 2i+1 in the high."""
    q = q.reshape(-1, 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k_chunk(x: np.ndarray) -> np.ndarray:
    head, q = _affine_superblocks(x, 15, -1.0, 20)
    return np.concatenate([head, _nibbles(q)], axis=1)


def _q5_k_chunk(x: np.ndarray) -> np.ndarray:
    head, q = _affine_superblocks(x, 31, -0.5, 15)
    high = (q >> 4) & 1  # (nb, 8, 32): bit j of byte i is sub-block j's fifth bit at position i
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    return np.concatenate([head, qh, _nibbles(q)], axis=1)


def _fit_symmetric(x: np.ndarray, nmax: int, nstep: int) -> np.ndarray:
    """Best scale per row of ``x`` (..., n) for codes -nmax..nmax-1 (x ~ scale*q), weights x**2.

    The candidate steps put the largest-magnitude weight at about -nmax
    (the side with one more level), plus one at exactly +(nmax-1), and
    refit the scale by least squares.

    >>> np.round(_fit_symmetric(np.array([[-32.0, 16.0, 8.0, 1.0]]), 32, 9), 4).tolist()
    [1.0]
    """
    w = x * x
    idx = np.argmax(np.abs(x), axis=-1)[..., None]
    amax = np.take_along_axis(x, idx, axis=-1)  # signed
    zero = amax[..., 0] == 0
    amax = np.where(amax == 0, 1.0, amax)
    best_s, best_err = np.zeros(x.shape[:-1], np.float32), np.full(x.shape[:-1], np.inf, np.float32)
    for inv in [-(nmax + 0.1 * s) / amax for s in range(-nstep, nstep + 1)] + [(nmax - 1) / amax]:
        q = np.clip(np.rint(x * inv), -nmax, nmax - 1)
        wq = w * q
        sl2 = (wq * q).sum(-1)
        a = (wq * x).sum(-1) / np.where(sl2 > 0, sl2, 1.0)
        err = np.sum(w * (a[..., None] * q - x) ** 2, axis=-1)
        better = err < best_err
        best_s, best_err = np.where(better, a, best_s), np.where(better, err, best_err)
    return np.where(zero, 0.0, best_s).astype(np.float32)


def _q6_k_chunk(x: np.ndarray) -> np.ndarray:
    xs = x.reshape(-1, 16, 16)
    scale = _fit_symmetric(xs, 32, 9)
    idx = np.argmax(np.abs(scale), axis=1)[:, None]
    smax = np.take_along_axis(scale, idx, axis=1)  # signed, (nb, 1)
    inv = np.where(smax != 0, -128.0 / np.where(smax != 0, smax, 1.0), 0.0)
    sc = np.clip(np.rint(scale * inv), -128, 127)
    d = _f16(np.where(inv != 0, 1.0 / np.where(inv != 0, inv, 1.0), 0.0))
    eff = (d * sc)[..., None]
    q = np.clip(np.rint(xs / np.where(eff != 0, eff, 1.0)), -32, 31)
    q = (np.where(eff != 0, q, 0) + 32).astype(np.uint8).reshape(-1, QK_K)
    lo = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.astype(np.float16).view(np.uint8)], axis=1)


_ENCODERS = {"Q4_K": (_q4_k_chunk, 144), "Q5_K": (_q5_k_chunk, 176), "Q6_K": (_q6_k_chunk, 210)}


def quantize_k(x: np.ndarray, kind: str) -> np.ndarray:
    """Encode a float array (..., n) with n % 256 == 0 as ``kind`` ("Q4_K", "Q5_K", "Q6_K").

    Returns uint8 (..., n // 256 * bytes_per_block), the raw layout
    ``GGUFWriter.add_tensor(..., raw_dtype=...)`` and ``gguf.quants.dequantize`` expect.

    >>> import gguf
    >>> x = np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)
    >>> b = quantize_k(x, "Q6_K")
    >>> b.shape, float(np.abs(gguf.quants.dequantize(b, gguf.GGMLQuantizationType.Q6_K) - x).max()) < 0.02
    ((2, 210), True)
    """
    if kind not in _ENCODERS:
        raise ValueError(f"unknown K-quant {kind!r}; known: {', '.join(_ENCODERS)}")
    if x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows that are a multiple of {QK_K}; got {x.shape[-1]}")
    encode, nbytes = _ENCODERS[kind]
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], nbytes), np.uint8)
    for i in range(0, blocks.shape[0], _CHUNK):
        out[i:i + _CHUNK] = encode(blocks[i:i + _CHUNK])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * nbytes)
