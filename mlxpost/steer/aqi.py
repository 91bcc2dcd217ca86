"""The Alignment Quality Index (Borah et al. 2025, arXiv 2506.13901) and the cluster indices it combines. Pure numpy.

Given pooled hidden states ``X`` (N, D) of examples labelled aligned (1) or
misaligned (0), with cluster centroids ``μ_k``, global mean ``μ`` and sizes ``n_k``:

* Calinski–Harabasz: ``CH = [Σ_k n_k‖μ_k − μ‖² / (K − 1)] / [Σ_k Σ_{i∈k} ‖x_i − μ_k‖² / (N − K)]``
  (between-cluster over within-cluster dispersion; higher = better separated);
* Xie–Beni (hard memberships): ``XB = Σ_k Σ_{i∈k} ‖x_i − μ_k‖² / (N · min_{j≠k} ‖μ_j − μ_k‖²)``
  (compactness over separation; lower = better);
* ``AQI = λ · (1 / XB) + (1 − λ) · CH`` with ``λ = 0.5`` by default, as in the paper, where both terms
  are "higher is better" and are normalized before they are combined.

Normalization, as done here. Both terms are put on (0, 1) with ``t ↦ t / (1 + t)`` (monotone, so
AQI still rises with separation), and CH enters *per example*: ``CH · (K − 1) / (N − K)`` = between-
over within-cluster dispersion. Textbook CH carries the degrees-of-freedom factor ``(N − K)/(K − 1)``,
so the same geometry read on twice the examples doubles it (for two balanced clusters
``CH ≈ (N − 2)/4 · (1/XB)``); squashed as it is, it saturates near 1 from a few dozen examples and the
AQI would depend on the data set's size. With the factor removed, AQI depends on the geometry only:
it is unchanged by duplicating the data and by scaling the hidden states (``aqi(c·X) = aqi(X)``).
CH itself (textbook, equal to scikit-learn's ``calinski_harabasz_score``), XB, Davies–Bouldin
(lower = better, equal to scikit-learn's ``davies_bouldin_score``) and Dunn (higher = better) are
reported unnormalized. The paper's own normalization of the two terms could not be checked against its
text from this machine; this one is stated here so that numbers can be compared across runs.
"""

from __future__ import annotations

import numpy as np

from ..errors import MlxpostError


def _clusters(x: np.ndarray, labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    ks = np.unique(labels)
    if len(ks) < 2:
        raise MlxpostError("AQI needs examples of both labels (aligned and misaligned)")
    groups = [x[labels == k] for k in ks]
    return groups, np.stack([g.mean(0) for g in groups])


def calinski_harabasz(x: np.ndarray, labels: np.ndarray) -> float:
    """Between- over within-cluster dispersion, each per degree of freedom.

    >>> x = np.array([[0.0], [1.0], [10.0], [11.0]]); calinski_harabasz(x, np.array([0, 0, 1, 1]))
    200.0
    """
    groups, mu = _clusters(x, labels)
    n, k, g = len(x), len(groups), x.mean(0)
    between = sum(len(c) * float(((m - g) ** 2).sum()) for c, m in zip(groups, mu)) / (k - 1)
    within = sum(float(((c - m) ** 2).sum()) for c, m in zip(groups, mu)) / (n - k)
    return between / within if within > 0 else float("inf")


def xie_beni(x: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster squared distances over N times the smallest squared centroid distance.

    >>> x = np.array([[0.0], [1.0], [10.0], [11.0]]); xie_beni(x, np.array([0, 0, 1, 1]))
    0.0025
    """
    groups, mu = _clusters(x, labels)
    within = sum(float(((c - m) ** 2).sum()) for c, m in zip(groups, mu))
    d = ((mu[:, None] - mu[None]) ** 2).sum(-1)
    sep = float(d[~np.eye(len(mu), dtype=bool)].min())
    return within / (len(x) * sep) if sep > 0 else float("inf")


def davies_bouldin(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean over clusters of the worst (s_i + s_j) / d(μ_i, μ_j), s = mean distance to the centroid.

    >>> x = np.array([[0.0], [1.0], [10.0], [11.0]]); davies_bouldin(x, np.array([0, 0, 1, 1]))
    0.1
    """
    groups, mu = _clusters(x, labels)
    s = np.array([np.linalg.norm(c - m, axis=1).mean() for c, m in zip(groups, mu)])
    d = np.linalg.norm(mu[:, None] - mu[None], axis=-1)
    k = len(mu)
    return float(np.mean([max((s[i] + s[j]) / d[i, j] for j in range(k) if j != i) for i in range(k)]))


def dunn(x: np.ndarray, labels: np.ndarray) -> float:
    """Smallest distance between points of different clusters over the largest cluster diameter.

    >>> x = np.array([[0.0], [1.0], [10.0], [11.0]]); dunn(x, np.array([0, 0, 1, 1]))
    9.0
    """
    groups, _ = _clusters(x, labels)
    diam = max(float(np.linalg.norm(c[:, None] - c[None], axis=-1).max()) for c in groups)
    sep = min(float(np.linalg.norm(a[:, None] - b[None], axis=-1).min())
              for i, a in enumerate(groups) for b in groups[i + 1:])
    return sep / diam if diam > 0 else float("inf")


def aqi(x: np.ndarray, labels: np.ndarray, weight: float = 0.5) -> dict:
    """AQI and its parts for pooled states ``x`` (N, D) and 0/1 ``labels`` (N,); see the module docstring.

    >>> rng = np.random.default_rng(0); base = rng.normal(size=(40, 4)); y = np.repeat([0, 1], 20)
    >>> near = aqi(base + 0.5 * y[:, None], y)["aqi"]; far = aqi(base + 4.0 * y[:, None], y)["aqi"]
    >>> 0 < near < far < 1
    True
    >>> x = base + y[:, None]; twice = aqi(np.vstack([x, x]), np.concatenate([y, y]))["aqi"]
    >>> bool(np.isclose(twice, aqi(x, y)["aqi"])), bool(np.isclose(aqi(7 * x, y)["aqi"], aqi(x, y)["aqi"]))
    (True, True)
    """
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)
    ch, xb = calinski_harabasz(x, labels), xie_beni(x, labels)
    n, k = len(x), len(np.unique(labels))
    inv_xb = 1.0 / xb if xb > 0 else float("inf")
    ch_per_example = ch * (k - 1) / (n - k)  # between / within dispersion: N-free (module docstring)
    squash = lambda t: 1.0 if t == float("inf") else t / (1.0 + t)  # noqa: E731
    return {"aqi": weight * squash(inv_xb) + (1 - weight) * squash(ch_per_example), "calinski_harabasz": ch,
            "xie_beni": xb, "davies_bouldin": davies_bouldin(x, labels), "dunn": dunn(x, labels), "n": int(n)}


def bootstrap_interval(x: np.ndarray, labels: np.ndarray, n: int = 200, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of AQI, resampling examples within each label."""
    rng = np.random.default_rng(seed)
    idx = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    vals = []
    for _ in range(n):
        pick = np.concatenate([rng.choice(i, size=len(i)) for i in idx])
        vals.append(aqi(x[pick], labels[pick])["aqi"])
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))
