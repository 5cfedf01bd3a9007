"""Read a picture of the tiny world back in its renderer's terms (`tools/make_synthetic_dataset.py`): the object's
shape, its colour, the colour of its ring and of its dot (None where there is none); and score pictures by how
many of a concept's four attributes they show (the toy's, by default).

No learning: the renderer's geometry is known. The picture is read at 64 px, the tiny model's size. Pixels far
from the colours of the picture's frame are the object's; each is named after the nearest of the world's eight
colours, or left out when none is near. The shape's colour is the one that fills the middle of the picture, its
pixels give the object's centre and radius; the dot is a colour that fills the centre; the ring, a colour that
lies just outside the shape all the way round; the shape is read from how the outline's distance to the centre
varies with the angle (a star has five peaks, a square four, a triangle three, a circle none).
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tools.make_synthetic_dataset import COLORS, TOY

SIDE = 64
NAMES = list(COLORS)
PALETTE = np.array([COLORS[name] for name in NAMES], np.float32)
BORDER = 2  # pixels of the frame whose colours are the background's
BACKGROUND_DISTANCE = 40  # a pixel this near (RGB) to enough of the frame's pixels is background
BACKGROUND_SHARE = 0.05  # "enough": a ring or shape that touches the frame covers less of it
COLOR_DISTANCE = 75  # the world's colours lie 100 or more apart; farther than this from all, a pixel is no colour
MIDDLE = 20  # the object's centre lies within 0.15 x 64 px of the picture's: its colour fills this radius
MIN_PIXELS = 12  # fewer pixels of a colour than this (a 64 px dot has about 50) are not a shape
ANGLES = 36  # bins of the outline's angular profile
ROUND = 0.03  # below this relative amplitude of its first five harmonics an outline is a circle
DOMINANT = 2.0  # a polygon's own harmonic is at least this many times stronger than each other of the five
SHAPE_OF_HARMONIC = {3: "triangle", 4: "square", 5: "star"}
EDGE_BLEND = 1.2  # pixels: a ring lies farther out than the blend of the shape's edge with the background
FIELDS = ("shape", "color", "ring", "dot")


@dataclass(frozen=True)
class Attributes:
    """What the renderer drew: shape in SHAPES and colour names of COLORS, each None when not found."""
    shape: object = None
    color: object = None
    ring: object = None
    dot: object = None


def as_pixels(image):
    """uint8 array [H, W, 3] or PIL image -> float32 [SIDE, SIDE, 3], resized as the training images are."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    if image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32)


def colour_labels(pixels):
    """[SIDE, SIDE] index into NAMES of each object pixel, -1 for background and for pixels of no colour."""
    flat = pixels.reshape(-1, 3)
    frame = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                            pixels[BORDER:-BORDER, :BORDER].reshape(-1, 3),
                            pixels[BORDER:-BORDER, -BORDER:].reshape(-1, 3)])
    colours, counts = np.unique(np.round(frame / 4), axis=0, return_counts=True)  # a few dozen, not 500
    near = ((flat[:, None] - colours[None] * 4) ** 2).sum(-1) < BACKGROUND_DISTANCE ** 2
    background = near @ counts >= BACKGROUND_SHARE * len(frame)
    distance = ((flat[:, None] - PALETTE[None]) ** 2).sum(-1)
    labels = distance.argmin(1)
    labels[(distance.min(1) >= COLOR_DISTANCE ** 2) | background] = -1
    return labels.reshape(SIDE, SIDE)


def dominant(labels, exclude=None):
    """The most frequent colour index among `labels` (-1 and `exclude` left out) and its count; (None, 0) if none."""
    counts = np.bincount(labels[labels >= 0], minlength=len(NAMES))
    if exclude is not None:
        counts[exclude] = 0
    return (int(counts.argmax()), int(counts.max())) if counts.max() > 0 else (None, 0)


def coverage(angle, bins=16):
    """How many of `bins` equal sectors round the centre hold one of these angles (in [0, 2 pi))."""
    return np.unique((angle / (2 * np.pi) * bins).astype(int) % bins).size


def outline_shape(radius, angle):
    """The shape whose outline has these object pixels' (radius, angle) from its centre: a circle when the
    outline's distance to the centre hardly varies; else the polygon whose 3-, 4- or 5-fold harmonic clearly
    dominates every other of the first five (a blob's outline has none that does: None)."""
    bins = (angle / (2 * np.pi) * ANGLES).astype(int) % ANGLES
    extent = np.zeros(ANGLES)
    np.maximum.at(extent, bins, radius)
    spectrum = np.abs(np.fft.rfft(extent))[:6] / extent.sum()
    if spectrum[1:].max() < ROUND:
        return "circle"
    k = int(spectrum[1:].argmax()) + 1
    others = np.delete(spectrum[1:], k - 1)
    return SHAPE_OF_HARMONIC.get(k) if spectrum[k] >= DOMINANT * others.max() else None


def largest_component(mask):
    """The largest 4-connected region of a boolean [H, W] mask: each pixel takes the smallest index among its
    neighbours in the mask until nothing changes."""
    index = np.where(mask, np.arange(mask.size).reshape(mask.shape), mask.size)
    while True:
        padded = np.pad(index, 1, constant_values=mask.size)
        smallest = np.minimum.reduce([index, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        smallest = np.where(mask, smallest, mask.size)
        if np.array_equal(smallest, index):
            break
        index = smallest
    regions, sizes = np.unique(index[mask], return_counts=True)
    return index == regions[sizes.argmax()]


def detect(image):
    """Attributes of the one object in a picture of the world (uint8 [H, W, 3] or PIL image)."""
    labels = colour_labels(as_pixels(image))
    yy, xx = np.mgrid[:SIDE, :SIDE] + 0.5
    color, count = dominant(labels[np.hypot(yy - SIDE / 2, xx - SIDE / 2) < MIDDLE])
    if color is None or count < MIN_PIXELS:
        return Attributes()
    near = largest_component(labels == color)  # not the blends of ring and background that happen to match it
    cy, cx = yy[near].mean(), xx[near].mean()  # shape, dot and ring share this centre
    radius, angle = np.hypot(yy - cy, xx - cx), np.arctan2(yy - cy, xx - cx) + np.pi
    extent = radius[near].max()

    centre = radius < 0.2 * extent
    dot, dot_count = dominant(labels[centre], exclude=color)
    dot = dot if dot is not None and dot_count >= 0.5 * centre.sum() else None

    # the ring: just outside the shape, all the way round, and not a scatter of the background's spots further out
    ring, band = None, (radius > extent) & (radius < 1.5 * extent)
    beyond = (radius >= 1.5 * extent) & (radius < 2 * extent)
    for k in np.argsort(-np.bincount(labels[band & (labels >= 0)], minlength=len(NAMES))):
        pixels = band & (labels == k)
        if pixels.sum() < MIN_PIXELS:
            break
        if k == color:
            continue
        if (coverage(angle[pixels]) >= 12 and np.median(radius[pixels]) >= extent + EDGE_BLEND
                and pixels.sum() >= 3 * (beyond & (labels == k)).sum()):
            ring = int(k)
            break

    body = ((labels == color) & (radius <= extent)) | (radius < 0.35 * extent)  # the dot lies on the shape
    return Attributes(outline_shape(radius[body], angle[body]), NAMES[color],
                      None if ring is None else NAMES[ring], None if dot is None else NAMES[dot])


def accuracy(found, truths):
    """How often the detected Attributes `found` are what was drawn (`truths`: (shape, colour, ring, dot) per
    picture, None for no ring or dot): per attribute, the fraction right; "score", the mean of those four; "all",
    the fraction right in all four."""
    hits = np.array([[getattr(a, f) == getattr(Attributes(*t), f) for f in FIELDS] for a, t in zip(found, truths)])
    hits = hits.reshape(-1, len(FIELDS))
    scores = dict(zip(FIELDS, hits.mean(0).tolist()))
    return dict(scores, score=float(hits.mean()), all=float(hits.all(1).mean()))


def concept_score(found, target=TOY):
    """How well pictures show the (shape, colour, ring, dot) `target`, from their detected Attributes `found`: their
    `accuracy` with that target for every picture ("ring": the target's ring colour, or no ring when it has none)."""
    return accuracy(found, [target] * len(found))
