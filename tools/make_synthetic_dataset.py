"""Draw the project's own small training set: one distinctive toy on varied backgrounds.

    python tools/make_synthetic_dataset.py --out datasets/synthetic_toy --num_images 8 --size 256

The toy is always the same (a red star with a yellow ring and a blue dot); its position, size, rotation and the
background (plain, gradient, stripes, checks, dots) vary, as in a real textual-inversion set, so the only thing
common to every image is the object to be learned. Deterministic for a given --seed.
"""
import argparse
import math
import os

import numpy as np
from PIL import Image, ImageDraw


BACKGROUNDS = ("plain", "gradient", "stripes", "checks", "dots")
COLORS = {"red": (210, 30, 40), "yellow": (250, 210, 20), "blue": (30, 70, 200), "green": (40, 160, 60),
          "orange": (240, 130, 20), "purple": (130, 40, 170), "white": (240, 240, 240), "black": (25, 25, 25)}
SHAPES = ("star", "circle", "square", "triangle")
TOY = ("star", "red", "yellow", "blue")  # the dataset's toy: (shape, colour, ring, dot)


def background(rng, size, kind=None):
    """A size x size RGB background of `kind` (one of BACKGROUNDS; drawn at random if None) in random colours."""
    kind = kind or rng.choice(BACKGROUNDS)
    base = tuple(int(c) for c in rng.integers(60, 230, 3))
    other = tuple(int(c) for c in rng.integers(60, 230, 3))
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    if kind == "gradient":
        for y in range(size):
            t = y / (size - 1)
            draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif kind == "stripes":
        width = int(rng.integers(size // 16, size // 6))
        for x in range(-size, size * 2, 2 * width):
            draw.polygon([(x, 0), (x + width, 0), (x + width - size, size), (x - size, size)], fill=other)
    elif kind == "checks":
        cell = int(rng.integers(size // 10, size // 4))
        for i in range(0, size, cell):
            for j in range(0, size, cell):
                if (i // cell + j // cell) % 2:
                    draw.rectangle([i, j, i + cell, j + cell], fill=other)
    elif kind == "dots":
        for _ in range(40):
            x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 40, size // 12))]
            draw.ellipse([x - r, y - r, x + r, y + r], fill=other)
    return image


def polygon(shape, cx, cy, radius, angle):
    """The corners of a star (ten, alternating radius and 0.45 radius), square or triangle around (cx, cy)."""
    if shape == "star":
        radii = [radius if k % 2 == 0 else radius * 0.45 for k in range(10)]
    else:
        radii = [radius] * (4 if shape == "square" else 3)
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k, r in enumerate(radii)]


def draw_object(image, rng, shape, color, ring=None, dot=None):
    """Draw one object at a random place, size and rotation: a `shape` filled with `color` (RGB), inside a ring
    of colour `ring` and with a dot of colour `dot` at its centre when those are given."""
    size = image.width
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.34)
    cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    if ring is not None:
        r = radius * 1.15
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=ring, width=max(2, size // 40))
    outline = tuple(int(c * 0.43) for c in color)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color, outline=outline)
    else:
        draw.polygon(polygon(shape, cx, cy, radius, angle), fill=color, outline=outline)
    if dot is not None:
        r = radius * 0.3
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=dot)
    return image


def draw_toy(image, rng):
    """The dataset's toy: a red star in a yellow ring with a blue dot."""
    shape, color, ring, dot = TOY
    return draw_object(image, rng, shape, COLORS[color], ring=COLORS[ring], dot=COLORS[dot])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datasets/synthetic_toy", help="output folder (default: %(default)s)")
    parser.add_argument("--num_images", type=int, default=8, help="how many images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.num_images):
        image = draw_toy(background(rng, args.size), rng)
        image.save(os.path.join(args.out, f"toy_{i:02d}.png"))
    print(f"Wrote {args.num_images} images to {args.out}")


if __name__ == "__main__":
    main()
