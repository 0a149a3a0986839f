"""Files and images the loss side of a run writes: the loss map (CSV + PNG), the learned weighting
(safetensors + PNG) and the loss heatmap (PNG), beside every state save and at the end of training, and the
tensorboard picture of the learned weights.

    write_loss_files(engine, metrics, folder, prefix)   # into a state folder (prefix "") or output_dir
    learned_weighting_image(engine)                     # HWC uint8, for tensorboard add_image

Names (prefix + name): loss_map.csv, loss_map.png, learned_weighting.safetensors, learned_weighting.png,
loss_heatmap.png. ``tools/show_timesteps.py --loss_map loss_map.csv`` and ``--learned_weights
learned_weighting.safetensors`` read them back; ``--loss_map_init`` starts a run from a loss_map file.
"""
from __future__ import annotations

import os

import numpy as np

LOSS_MAP_CSV, LOSS_MAP_PNG = "loss_map.csv", "loss_map.png"
LEARNED_FILE, LEARNED_PNG = "learned_weighting.safetensors", "learned_weighting.png"
HEATMAP_PNG = "loss_heatmap.png"


def noise_axis(engine) -> tuple[np.ndarray, str]:
    """The bin index grid and its axis label (DDPM: timestep t; flow: floor(1000σ))."""
    label = "timestep t" if engine.kind == "ddpm" else "bin = floor(1000σ)"
    return np.arange(engine.num_bins), label


def write_loss_files(engine, metrics, folder: str, prefix: str = "") -> list[str]:
    """Write what the run has: the loss map, the learned weighting, the heatmap. Returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    path = lambda name: os.path.join(folder, prefix + name)  # noqa: E731
    written = []
    if engine.loss_map is not None:
        engine.loss_map.to_csv(path(LOSS_MAP_CSV))
        engine.loss_map.to_png(path(LOSS_MAP_PNG))
        written += [path(LOSS_MAP_CSV), path(LOSS_MAP_PNG)]
    if engine.learned is not None:
        grid = engine.grid_levels()
        index, label = noise_axis(engine)
        engine.learned.save_file(path(LEARNED_FILE))
        engine.learned.to_png(path(LEARNED_PNG), grid.bins, engine.noise_fraction(grid), label)
        written += [path(LEARNED_FILE), path(LEARNED_PNG)]
    if metrics is not None and len(metrics.heatmap_array()[0]):
        from PIL import Image

        Image.fromarray(metrics.heatmap_image()).save(path(HEATMAP_PNG))
        written.append(path(HEATMAP_PNG))
    return written


def learned_weighting_image(engine) -> np.ndarray:
    """u(σ) and exp(−u) over the noise-level grid as an HWC uint8 RGB array (tensorboard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from library.learned_weighting import draw_curve

    grid = engine.grid_levels()
    index, label = noise_axis(engine)
    figure = Figure(figsize=(8, 3), dpi=80)
    canvas = FigureCanvasAgg(figure)
    draw_curve(figure, index, engine.learned.curve(engine.noise_fraction(grid)).numpy(), label)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
