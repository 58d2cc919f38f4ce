"""A render-and-compare detector for the toy world (world.py): which shape, if any, is drawn in a colour.

The world is procedural, so its shapes need no learned detector: take the pixels near the asked colour, and
slide every shape's silhouette (world.shape_mask) at every radius over them; the best intersection-over-union
names the shape, and too low a best IoU means nothing of that colour and shape is there. An empty scene, a blob
or a dot pattern fits no silhouette well, so it cannot score as an object (the toy CLIP and the factor
classifier could be fooled that way). A two-colour subject (world.NOVEL_SUBJECTS: a yellow-purple checkered
star, ...) is present when its shape fits the pixels near either of its colours, or their blends, and both
colours cover a fair share of the fitted silhouette, so a plain star in one of its colours is not the subject.

    detect(image, "red")                 -> {"shape": "star", "iou": 0.81, "x": 30, "y": 33, "r": 14, "present": True}
    detect_any(image)                    -> the best fit over the world's colours (a class prompt names no colour)
    subject_present(image, "checkered_star") -> {"present": True, "iou": ..., "shares": (0.52, 0.41)}

The correlations of a mask with every shifted silhouette are computed at once by FFT (the mask padded to 128 px
so nothing wraps round). Thresholds are calibrated on real renders and on their VAE round trips
(tests/test_detector.py, benchmarks/bench_toy_world.py). Images: (64, 64, 3) uint8 arrays or PIL images.
"""
from functools import lru_cache

import numpy as np
from PIL import Image

import world

RADII = np.arange(5.0, 24.0)   # silhouette radii tried, in pixels (the world draws 11 to 19; generated ones vary)
COLOUR_TOL = 50.0              # RGB distance within which a pixel counts as the asked colour
BLEND_TOL = 45.0               # a two-colour subject: distance to the segment between its colours (their blends)
MIN_IOU = 0.45                 # best IoU below this: no such object
MIN_PIXELS = 20                # a region of fewer pixels than this is not looked at
MIN_RADIUS = 9.5               # a fit smaller than this is a cloud or a speck, not an object (the world draws >= 11)
COMPONENTS = 3                 # the largest connected regions of a colour mask that are fitted, each on its own
MIN_SUBJECT_IOU = 0.5          # a subject's silhouette fit must be at least this good
MIN_SHARE = 0.10               # a two-colour subject: each colour covers at least this share of its silhouette
PAD = 2 * world.SIZE


def to_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)


@lru_cache(maxsize=None)
def silhouettes() -> tuple[np.ndarray, np.ndarray]:
    """(shapes, radii, PAD, PAD) silhouettes centred at the origin (wrapped), and the rfft2 of each."""
    c = np.arange(PAD, dtype=np.float32)
    c = np.where(c < PAD // 2, c, c - PAD) + 0.0                    # pixel offsets -PAD/2..PAD/2-1, origin at [0, 0]
    v, u = np.meshgrid(c, c, indexing="ij")
    masks = np.stack([np.stack([world.shape_mask(s, u / r, v / r) for r in RADII]) for s in world.SHAPES])
    masks = masks.astype(np.float32)
    return masks, np.fft.rfft2(masks)


def fit(mask: np.ndarray) -> dict:
    """Best silhouette for a boolean (64, 64) mask: {"shape", "iou", "x", "y", "r", "ious"} (ious: per shape)."""
    masks, spectra = silhouettes()
    padded = np.zeros((PAD, PAD), np.float32)
    padded[:world.SIZE, :world.SIZE] = mask
    # inter[s, r, y, x] = sum over pixels of mask * (silhouette (s, r) centred at (x, y))
    inter = np.fft.irfft2(np.fft.rfft2(padded) * np.conj(spectra), s=(PAD, PAD))[..., :world.SIZE, :world.SIZE]
    area = masks.sum(axis=(-1, -2))[..., None, None]
    iou = inter / (mask.sum() + area - inter + 1e-6)
    s, r, y, x = np.unravel_index(np.argmax(iou), iou.shape)
    return {"shape": world.SHAPES[s], "iou": float(iou[s, r, y, x]), "x": int(x), "y": int(y), "r": float(RADII[r]),
            "ious": {name: float(iou[i].max()) for i, name in enumerate(world.SHAPES)}}


def colour_distance(pixels: np.ndarray, rgb) -> np.ndarray:
    return np.linalg.norm(pixels - np.asarray(rgb, np.float32), axis=-1)


def segment_distance(pixels: np.ndarray, a, b) -> tuple[np.ndarray, np.ndarray]:
    """RGB distance of each pixel to the segment a-b (a two-colour pattern and its blends), and where it lies
    on it (0 at a, 1 at b)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    t = np.clip(((pixels - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    return np.linalg.norm(pixels - (a + t[..., None] * (b - a)), axis=-1), t


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The COMPONENTS largest 4-connected regions of a boolean mask with >= MIN_PIXELS pixels, largest first. The
    world outlines every object in a dark rim, so an object is its own region even on a background of its colour
    (a white shape in the snow)."""
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:                                    # every pixel takes the smallest label among its neighbours
        padded = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, new, big)
        if (new == labels).all():
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    order = np.argsort(-counts)
    return [labels == ids[i] for i in order[:COMPONENTS] if counts[i] >= MIN_PIXELS]


def best_fit(mask: np.ndarray) -> dict | None:
    """fit() of each large region of the mask; the best one of radius >= MIN_RADIUS (None: no region)."""
    fits = [f for f in (fit(m) for m in components(mask)) if f["r"] >= MIN_RADIUS]
    return max(fits, key=lambda f: f["iou"]) if fits else None


def _result(mask: np.ndarray) -> dict:
    best = best_fit(mask)
    if best is None:
        return {"shape": None, "iou": 0.0, "x": None, "y": None, "r": None, "present": False}
    best.pop("ious")
    return {**best, "present": best["iou"] >= MIN_IOU}


def detect(image, colour: str) -> dict:
    """The best-fitting shape among the pixels within COLOUR_TOL of world.COLOURS[colour] (plain objects: the
    stripes of a striped one cut it into bands that fit nothing)."""
    return _result(colour_distance(to_array(image), world.COLOURS[colour]) < COLOUR_TOL)


def detect_any(image) -> dict:
    """detect() for every colour of the world; the best fit wins (a prompt without a colour word)."""
    best = max((dict(detect(image, c), colour=c) for c in world.COLOURS), key=lambda d: d["iou"])
    return best if best["present"] else {**best, "shape": None}


def shape_present(image, shape: str, colour: str | None = None) -> bool:
    """Is there an object of `shape` (in `colour`, or in any colour of the world)?"""
    return any((d := detect(image, c))["present"] and d["shape"] == shape for c in ([colour] if colour else world.COLOURS))


def silhouette_at(shape: str, x: float, y: float, r: float) -> np.ndarray:
    c = np.arange(world.SIZE, dtype=np.float32)
    v, u = np.meshgrid(c, c, indexing="ij")
    return world.shape_mask(shape, (u - x) / r, (v - y) / r)


def subject_present(image, subject: str) -> dict:
    """Is the novel subject `subject` (a key of world.NOVEL_SUBJECTS) in the image? Its shape must fit the pixels
    near its two colours (or their blends) best, with IoU >= MIN_SUBJECT_IOU, and each colour must cover >= MIN_SHARE of
    the fitted silhouette."""
    spec = world.NOVEL_SUBJECTS[subject]
    a, b = world.COLOURS[spec["colour"]], world.COLOURS[spec["second_colour"]]
    pixels = to_array(image)
    distance, t = segment_distance(pixels, a, b)
    mask = (colour_distance(pixels, a) < COLOUR_TOL) | (colour_distance(pixels, b) < COLOUR_TOL) | (distance < BLEND_TOL)
    best = best_fit(mask)
    if best is None:
        return {"present": False, "iou": 0.0, "shape": None, "shares": (0.0, 0.0)}
    silhouette = silhouette_at(best["shape"], best["x"], best["y"], best["r"])
    inside, n = silhouette & mask, max(int(silhouette.sum()), 1)
    shares = (float((inside & (t < 0.35)).sum() / n), float((inside & (t > 0.65)).sum() / n))
    present = best["shape"] == spec["shape"] and best["iou"] >= MIN_SUBJECT_IOU and min(shares) >= MIN_SHARE
    return {"present": bool(present), "iou": best["iou"], "shape": best["shape"], "shares": shares}


if __name__ == "__main__":   # python detector.py IMAGE [COLOUR|SUBJECT]: what the detector sees in one image
    import sys
    img = Image.open(sys.argv[1])
    what = sys.argv[2] if len(sys.argv) > 2 else None
    print(subject_present(img, what) if what in world.NOVEL_SUBJECTS else detect(img, what) if what else detect_any(img))
