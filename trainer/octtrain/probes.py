"""Inputs that are not retinal OCT B-scans at all, drawn here because nothing can be fetched:
a blank frame, a screenshot-like page of text lines and a fundus-like photograph (a bright
disc with vessels on a dark field, in grey as the edge converts colour)."""

from __future__ import annotations

import numpy as np


def non_oct_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Each made-up input by name, as a grey image in [0, 1]."""
    rng = np.random.default_rng(seed)
    h, w = 496, 512
    blank = np.full((h, w), 0.02, np.float32) + rng.normal(0, 0.003, (h, w)).astype(np.float32)
    page = np.full((h, w), 0.95, np.float32)
    page[:40] = 0.3
    for y in range(70, h - 20, 22):
        length = int(rng.integers(w // 4, w - 40))
        page[y:y + 9, 20:20 + length] = 0.1 + 0.1 * rng.random((9, length))
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2)
    fundus = np.where(r < 230, 0.45 - 0.25 * (r / 230) ** 2, 0.0)
    fundus += np.where(np.hypot(yy - h / 2, xx - w * 0.65) < 35, 0.35, 0.0)  # optic disc
    for angle in np.linspace(0, 2 * np.pi, 9)[:-1]:
        t = np.linspace(0, 200, 400)
        vy = (h / 2 + np.sin(angle) * t + 8 * np.sin(t / 25)).astype(int)
        vx = (w * 0.65 + np.cos(angle) * t).astype(int) - int(w * 0.15)
        ok = (vy >= 2) & (vy < h - 2) & (vx >= 2) & (vx < w - 2)
        for dy in range(-2, 3):
            fundus[vy[ok] + dy, vx[ok]] *= 0.5
    fundus = np.clip(fundus + rng.normal(0, 0.01, (h, w)), 0, 1).astype(np.float32)
    return {"blank": blank, "screenshot": page.astype(np.float32), "fundus_like": fundus}
