"""Render-and-compare face identity for the toy world's faces (world.face): is a drawn face this identity?

A toy identity (world.face_identity) is five factors: skin tone, hair colour, hair style, eye colour and head
shape (width and chin). Its drawings vary only in pose (a few pixels of offset, +-7% scale), expression,
background tint and shirt. So no learned face encoder is needed: render the identity's parts (world.face_layers)
at every pose on a grid, keep the pose whose silhouette (head, ears, neck and hair, whatever their colours) best
overlaps the pixels that are not background, and read the factors there:

    skin, hair, eyes  the median colour of the pixels the render calls head / hair / iris is nearest, among the
                      world's palette (world.SKIN_TONES, HAIR_COLOURS, EYE_COLOURS), to the identity's own, and
                      within COLOUR_TOL of it;
    hair style        the identity's hair style fits the silhouette better than each of the other five would;
    head shape        the silhouette fits with IoU >= SHAPE_IOU, and better than the same head made narrower or
                      wider by WIDTH_STEP.

    score(image, 7)      -> {"present": True, "iou": 0.93, "score": 1.0, "factors": {"skin": True, ...}, ...}
    score(image, face)   -> the same for a world.Face (a made-up identity: a swapped skin and hair, ...)

`score` is the share of the five factors matched, 0 where no face is found (best IoU < MIN_IOU): an empty
background or a blob cannot pass for a face, and a face of other colours or another shape scores only for the
factors it shares (chance, for a random other identity, is about a fifth: tests/test_face_id.py measures it).
Thresholds are calibrated on real renders and their round trips through the toy model's VAE
(tests/test_face_id.py). Images: (64, 64, 3) uint8 arrays or PIL images.
"""
from dataclasses import replace

import numpy as np

import world
from detector import to_array

BACKGROUND_TOL = 22.0    # RGB distance from the background model beyond which a pixel is part of the figure
MIN_IOU = 0.75           # best silhouette IoU below this: no face (real renders >= 0.98, blanks and scenes <= 0.62)
SHAPE_IOU = 0.90         # the head shape factor needs at least this IoU
WIDTH_STEP = 0.08        # head shape: the identity's width must fit better than width -+ this
COLOUR_TOL = 45.0        # a read colour further than this from the identity's is not it
FACTORS = ("skin", "hair", "eyes", "hair_style", "head_shape")
SILHOUETTE = ("long hair", "neck", "ears", "head", "bun", "hair")   # the parts an identity's outline is made of


def background(pixels: np.ndarray) -> np.ndarray:
    """The background the world paints behind a face, a tint darkening by 15% towards the bottom, with the tint
    read from the top corners (no face reaches them)."""
    rows = (np.arange(world.SIZE, dtype=np.float32) + 0.5) / world.SIZE
    shade = 1 - 0.15 * rows                                                  # (64,)
    corners = np.concatenate([pixels[:4, :4], pixels[:4, -4:]], axis=1) / shade[:4, None, None]
    tint = np.median(corners.reshape(-1, 3), axis=0)
    return tint[None, None, :] * shade[:, None, None]


def figure_mask(pixels: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pixels - background(pixels), axis=-1) > BACKGROUND_TOL


def head_grid(face: world.Face, poses: np.ndarray, ss: int = 1):
    """Head units (u, v), (P, 64 ss, 64 ss), of the face drawn at each (dx, dy, scale) row of `poses`: world.head_units
    for all poses at once."""
    dx, dy, scale = (poses[:, i, None, None] for i in range(3))
    c = (np.arange(world.SIZE * ss, dtype=np.float32) + 0.5) / ss
    y, x = np.meshgrid(c, c, indexing="ij")
    b = 19 * scale
    return (x - 32 - dx) / (b * face.width), (y - 31 - dy) / b


def labels(face: world.Face, poses: np.ndarray, ss: int = 1) -> tuple[np.ndarray, list]:
    """(P, 64 ss, 64 ss) index of the part each cell shows (-1: background) for the face drawn at each pose, and
    the parts [(name, mask, rgb)] (world.face_layers: a later part covers an earlier one)."""
    layers = world.face_layers(face, *head_grid(face, poses, ss))
    out = np.full(layers[0][1].shape, -1, np.int8)
    for i, (_, mask, _) in enumerate(layers):
        out[mask] = i
    return out, layers


def silhouette_iou(label: np.ndarray, layers: list, figure: np.ndarray) -> np.ndarray:
    """IoU of each pose's silhouette with the figure, over the pixels the render does not call shirt."""
    names = [name for name, _, _ in layers]
    silhouette = np.isin(label, [i for i, n in enumerate(names) if n in SILHOUETTE])
    # the pixels just outside the silhouette do not count: the world's anti-aliased edge makes a pixel that a
    # part only partly covers stand out from the background, so the figure is the silhouette grown by up to a pixel
    padded = np.pad(silhouette, ((0, 0), (1, 1), (1, 1)))
    ring = (padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]) & ~silhouette
    fig = figure[None] & (label != names.index("shirt")) & ~ring
    inter = (silhouette & fig).sum(axis=(-1, -2))
    return inter / np.maximum((silhouette | fig).sum(axis=(-1, -2)), 1)


def pose_grid(shifts, scales) -> np.ndarray:
    return np.array([(dx, dy, s) for dx in shifts for dy in shifts for s in scales], np.float32)


def fit_pose(face: world.Face, figure: np.ndarray) -> tuple[np.ndarray, float]:
    """The (dx, dy, scale) whose silhouette of `face` best overlaps the figure, and its IoU: a 3 x 3 x 3 grid of
    3 px and 9% steps around the middle, then the same grid at half the steps around the best, twice more (a
    silhouette's IoU changes smoothly with its pose, so the search does not get stuck)."""
    best, step = np.array([0.0, 0.0, 1.0], np.float32), 1.0
    for _ in range(4):
        poses = best + pose_grid(np.array([-3.0, 0, 3.0]) * step, np.array([-0.09, 0, 0.09]) * step)
        iou = silhouette_iou(*labels(face, poses), figure)
        best, step = poses[int(np.argmax(iou))], step / 2
    return best, float(iou.max())


def inverse_render(pixels: np.ndarray, face: world.Face, poses: np.ndarray, ss: int = 2) -> tuple[list[dict], np.ndarray]:
    """The colours of the identity's parts in the image, for each pose, and the squared error left: render the face
    at `ss` x `ss` cells per pixel, so each pixel is a known mix of parts (its coverages), and solve pixels =
    coverages x colours by least squares for the unknown colours: skin (head; the ears, neck and nose are fixed
    shades of it), hair (hair, long hair, bun; the brows are a shade of it), iris and shirt. The eye whites,
    pupils and mouth have the world's fixed colours and the background is background(). A two-pixel iris is read
    this way from its pixels' mixes with the white and the pupil, which a median over "iris" pixels could not do.
    Returns ([{part: rgb or None}] per pose, (P,) sums of squared errors)."""
    label, layers = labels(face, poses, ss)
    n, keys = world.SIZE, ["skin", "hair", "iris", "shirt"]
    columns, fixed = np.zeros((len(layers), len(keys)), np.float32), np.zeros((len(layers), 3), np.float32)
    for i, (name, _, rgb) in enumerate(layers):       # each part: a multiple of an unknown colour, or a known one
        if name in ("shirt", "iris"):
            columns[i, keys.index(name)] = 1
            continue
        for key, own in (("skin", face.skin), ("hair", face.hair)):
            ratio = np.asarray(rgb) / np.asarray(own, np.float64)
            if np.allclose(ratio, ratio[0], atol=1e-6) and ratio[0] > 0.5:
                columns[i, keys.index(key)] = ratio[0]
                break
        else:
            fixed[i] = rgb
    back = background(pixels).reshape(1, n, 1, 3).repeat(n, 2).reshape(-1, 3)
    target = pixels.reshape(-1, 3)
    colours, errors = [], []
    for lab in label:
        coverage = np.stack([lab == i for i in range(len(layers))], -1).reshape(n, ss, n, ss, -1).mean(axis=(1, 3))
        coverage = coverage.reshape(n * n, -1)                                       # (pixels, parts)
        design = coverage @ columns
        known = coverage @ fixed + (1 - coverage.sum(-1, keepdims=True)) * back
        used = design.sum(0) > 0
        solution = np.zeros((len(keys), 3), np.float32)
        solution[used] = np.linalg.lstsq(design[:, used], target - known, rcond=None)[0]
        errors.append(float(((design @ solution + known - target) ** 2).sum()))
        colours.append({k: (np.clip(solution[j], 0, 255) if used[j] else None) for j, k in enumerate(keys)})
    return colours, np.array(errors)


def refine_pose(pixels: np.ndarray, face: world.Face, pose: np.ndarray) -> tuple[np.ndarray, dict]:
    """The pose within half a pixel and 1% of `pose` whose inverse render leaves the least error (the silhouette
    alone places the head to about half a pixel, too coarse for the eyes), and the part colours there."""
    poses = pose + pose_grid(np.arange(-0.5, 0.51, 0.25), np.array([0.0]))
    poses = np.concatenate([poses, pose + np.array([[0, 0, -0.01], [0, 0, 0.01]], np.float32)])
    colours, errors = inverse_render(pixels, face, poses)
    best = int(np.argmin(errors))
    return poses[best], colours[best]


def colour_match(colour: np.ndarray | None, palette, own) -> tuple[bool, float]:
    """Is `colour` nearest to `own` among `palette`, and within COLOUR_TOL of it? (match, distance to own)"""
    if colour is None:
        return False, float("inf")
    distances = [float(np.linalg.norm(colour - np.asarray(p, np.float32))) for p in palette]
    own_distance = float(np.linalg.norm(colour - np.asarray(own, np.float32)))
    return bool(own_distance <= min(distances) + 1e-6 and own_distance <= COLOUR_TOL), own_distance


def score(image, identity) -> dict:
    """How well the face drawn in `image` matches `identity` (an int for world.face_identity, or a world.Face):
    {"present", "iou", "pose", "factors": {factor: bool}, "distances": {colour factor: RGB distance}, "score"}."""
    face = world.face_identity(identity) if isinstance(identity, (int, np.integer)) else identity
    pixels = to_array(image)
    figure = figure_mask(pixels)
    pose, iou = fit_pose(face, figure)
    if iou < MIN_IOU:
        return {"present": False, "iou": iou, "pose": [float(p) for p in pose],
                "factors": dict.fromkeys(FACTORS, False), "distances": {}, "score": 0.0}
    pose, colours = refine_pose(pixels, face, pose)
    factors, distances = {}, {}
    for factor, part, palette, own in (("skin", "skin", world.SKIN_TONES, face.skin),
                                       ("hair", "hair", world.HAIR_COLOURS, face.hair),
                                       ("eyes", "iris", world.EYE_COLOURS, face.eyes)):
        factors[factor], distances[factor] = colour_match(colours[part], palette, own)

    def fit_of(other: world.Face) -> float:        # its silhouette's IoU at its own best pose
        return fit_pose(other, figure)[1]
    styles = {s: fit_of(replace(face, hair_style=s)) for s in world.HAIR_STYLES if s != face.hair_style}
    factors["hair_style"] = bool(iou > max(styles.values()))
    widths = [fit_of(replace(face, width=face.width + d)) for d in (-WIDTH_STEP, WIDTH_STEP)]
    factors["head_shape"] = bool(iou >= SHAPE_IOU and iou > max(widths))
    return {"present": True, "iou": iou, "pose": [float(p) for p in pose], "factors": factors, "distances": distances,
            "score": float(np.mean(list(factors.values())))}


if __name__ == "__main__":   # python face_id.py IMAGE IDENTITY: how well a drawn face matches a toy identity
    import sys

    from PIL import Image
    print(score(Image.open(sys.argv[1]), int(sys.argv[2])))
