"""Write a small captioned demo dataset from scikit-image's bundled sample images (offline).

    python tools/make_demo_data.py --out DIR [--repeats 10] [--class_tokens "sks photo"]

Creates DIR/<repeats>_<class tokens>/ (kohya folder naming) with 8 images of different sizes and aspect
ratios (square, landscape, portrait, grey and RGBA sources converted to RGB, png and jpg) and a .txt caption for
most of them; the others fall back to the class tokens, as kohya does.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# (skimage.data function, file name, crop (top, left, height, width) or None, caption or None)
SAMPLES = (
    ("astronaut", "astronaut.png", None, "sks photo, an astronaut in a white suit in front of a flag"),
    ("coffee", "coffee.jpg", None, "sks photo, a cup of coffee on a saucer, top view"),
    ("chelsea", "chelsea.png", None, "sks photo, a tabby cat looking to the side"),
    ("rocket", "rocket.jpg", (0, 200, 427, 240), "sks photo, a rocket on the launch pad, tall"),
    ("camera", "camera.png", None, None),
    ("coins", "coins.png", (0, 0, 303, 200), "sks photo, old coins on a dark background"),
    ("immunohistochemistry", "ihc.jpg", (0, 0, 256, 512), None),
    ("logo", "logo.png", None, "sks photo, the scikit-image logo"),
)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxW, HxWx3 or HxWx4 -> HxWx3 (alpha composited on white)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)
        return rgb.round().astype(np.uint8)
    return image


def make_demo_data(out: str, repeats: int = 10, class_tokens: str = "sks photo") -> str:
    """Write the images and captions; returns the image folder."""
    from PIL import Image
    from skimage import data

    folder = os.path.join(out, f"{repeats}_{class_tokens}")
    os.makedirs(folder, exist_ok=True)
    for name, filename, crop, caption in SAMPLES:
        image = to_rgb(getattr(data, name)())
        if crop is not None:
            top, left, height, width = crop
            image = image[top:top + height, left:left + width]
        path = os.path.join(folder, filename)
        Image.fromarray(image).save(path, **({"quality": 92} if filename.endswith(".jpg") else {}))
        if caption is not None:
            with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
                f.write(caption + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root (the --train_data_dir)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--class_tokens", default="sks photo")
    args = parser.parse_args(argv)
    print(make_demo_data(args.out, args.repeats, args.class_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
