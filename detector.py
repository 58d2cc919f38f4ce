"""A render-and-compare detector for the toy world (world.py): which shape, if any, is drawn in a colour.

The world is procedural, so its shapes need no learned detector: take the pixels near the asked colour, and
slide every shape's silhouette (world.shape_mask) at every radius over them; the best intersection-over-union
names the shape, and too low a best IoU means nothing of that colour and shape is there. An empty scene, a blob
or a dot pattern fits no silhouette well, so it cannot score as an object (the toy CLIP and the factor
classifier could be fooled that way). A two-colour subject (world.NOVEL_SUBJECTS: a yellow-purple checkered
star, ...) is present when its shape fits the pixels near either of its colours, or their blends, and both
colours cover a fair share of the fitted silhouette, so a plain star in one of its colours is not the subject.

    detect(image, "red")                 -> {"shape": "star", "iou": 0.81, "x": 30, "y": 33, "r": 14, "present": True}
    detect_any(image)                    -> the best fit over the world's colours and the foreground (a class
                                            prompt names no colour; its objects may mix several)
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
RING = 4                       # detect_any: the outer pixels that sample the scene (objects are drawn away from them)
BACKGROUND_TOL = 30.0          # detect_any: a pixel farther than this from every ring pixel's colour is foreground
MAX_HOLE = 60                  # detect_any: enclosed background regions smaller than this are filled (checker cells)
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


def label(mask: np.ndarray) -> np.ndarray:
    """4-connected regions of a boolean mask: each masked pixel holds its region's smallest pixel index."""
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:                                    # every pixel takes the smallest label among its neighbours
        padded = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, new, big)
        if (new == labels).all():
            return labels
        labels = new


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The COMPONENTS largest 4-connected regions of a boolean mask with >= MIN_PIXELS pixels, largest first. The
    world outlines every object in a dark rim, so an object is its own region even on a background of its colour
    (a white shape in the snow)."""
    labels = label(mask)
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


def foreground(image) -> np.ndarray:
    """The pixels unlike every pixel of the image's outer RING: an object in any colours, blends and patterns
    included. A generated "a star" (no colour word) often mixes colours that no one-colour mask holds whole. The
    world draws one object within 6 px of the middle (world.CENTRE_JITTER), so the ring samples only the scene, its
    texture included (a brick wall's mortar, the snow's shading)."""
    pixels = to_array(image)
    ring = np.concatenate([pixels[:RING], pixels[-RING:], pixels[:, :RING].swapaxes(0, 1),
                           pixels[:, -RING:].swapaxes(0, 1)]).reshape(-1, 3)[::3]     # every third: enough, faster
    nearest = np.full(pixels.shape[:2], np.inf, np.float32)
    for chunk in np.array_split(ring, 8):          # distance to the nearest ring colour, a few hundred at a time
        nearest = np.minimum(nearest, np.linalg.norm(pixels[:, :, None] - chunk, axis=-1).min(-1))
    return nearest > BACKGROUND_TOL


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with the small regions it encloses added (fewer than MAX_HOLE pixels, out of the border's reach):
    the cells of a checkered object whose colour is also the scene's, not a ring's hole."""
    labels = label(~mask)
    ids, counts = np.unique(labels[~mask], return_counts=True)
    edge = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
    small = ids[(counts < MAX_HOLE) & ~np.isin(ids, edge)]
    return mask | np.isin(labels, small)


def nearest_colour(image, fitted: dict) -> str:
    """The world's colour nearest to the median pixel inside a fitted silhouette."""
    inside = to_array(image)[silhouette_at(fitted["shape"], fitted["x"], fitted["y"], fitted["r"])]
    median = np.median(inside, axis=0) if len(inside) else np.zeros(3, np.float32)
    return min(world.COLOURS, key=lambda c: float(colour_distance(median, world.COLOURS[c])))


def detect_any(image) -> dict:
    """The best fit over detect() in every colour of the world and over the foreground (a prompt without a colour
    word: the object may be any colour, or several); "colour" names the one asked, or for a foreground fit the
    world's colour nearest to its median pixel."""
    found = [dict(detect(image, c), colour=c) for c in world.COLOURS]
    mask = foreground(image)
    for fg in (_result(mask), _result(fill_holes(mask))):   # with its holes filled, and as it is (a ring's hole)
        if fg["shape"] is not None:
            found.append(dict(fg, colour=nearest_colour(image, fg)))
    best = max(found, key=lambda d: d["iou"])
    return best if best["present"] else {**best, "shape": None}


def shape_present(image, shape: str, colour: str | None = None) -> bool:
    """Is there an object of `shape` (in `colour`, or in any colours: detect_any)?"""
    if colour:
        return (d := detect(image, colour))["present"] and d["shape"] == shape
    return detect_any(image)["shape"] == shape


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
