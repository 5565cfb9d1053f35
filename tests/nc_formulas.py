"""Independent float64 (numpy / scipy) implementations of the NC1-NC4
formulas, for the tests: per-class loops, scipy's pinv of the D x D Sigma_B."""
from __future__ import annotations

import numpy as np
import scipy.linalg


def etf(k: int) -> np.ndarray:
    return (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)


def stats64(h, y, num_classes):
    h = np.asarray(h, dtype=np.float64)
    y = np.asarray(y)
    n, d = h.shape
    counts = np.bincount(y, minlength=num_classes)
    present = np.flatnonzero(counts)
    means = np.zeros((num_classes, d))
    sigma_w = np.zeros((d, d))
    for k in present:
        hk = h[y == k]
        means[k] = hk.mean(0)
        z = hk - means[k]
        sigma_w += z.T @ z
    sigma_w /= n
    mu_g = h.mean(0)
    mt = means[present] - mu_g
    sigma_b = mt.T @ mt / len(present)
    return dict(counts=counts, means=means, global_mean=mu_g, sigma_w=sigma_w, sigma_b=sigma_b, present=present)


def metrics64(h, y, num_classes, weight=None, bias=None):
    s = stats64(h, y, num_classes)
    present = s["present"]
    kp = len(present)
    mt = s["means"][present] - s["global_mean"]
    out = {"nc1": np.trace(s["sigma_w"] @ scipy.linalg.pinv(s["sigma_b"])) / kp}
    norms = np.linalg.norm(mt, axis=1)
    out["nc2_equinorm"] = norms.std() / norms.mean()
    cos = [mt[a] @ mt[b] / (norms[a] * norms[b]) for a in range(kp) for b in range(a + 1, kp)]
    out["nc2_equiangular"] = float(np.mean(np.abs(np.array(cos) + 1.0 / (kp - 1))))
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        g = w @ w.T
        out["nc2"] = np.linalg.norm(g / np.linalg.norm(g) - etf(num_classes))
        wp, mbar = w[present], s["means"][present]
        a = wp @ mbar.T
        out["nc3"] = np.linalg.norm(a / np.linalg.norm(a) - etf(kp))
        out["nc3_duality"] = np.linalg.norm(wp / np.linalg.norm(wp) - mt / np.linalg.norm(mt))
        hh = np.asarray(h, dtype=np.float64)
        dist = ((hh[:, None, :] - s["means"][present][None]) ** 2).sum(-1)
        nearest = present[np.argmin(dist, axis=1)]
        logits = hh @ w.T + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))
        out["nc4"] = float(np.mean(nearest != np.argmax(logits, axis=1)))
    return out
