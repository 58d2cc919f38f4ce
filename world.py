"""A procedural captioned world: 64x64 images of one or two coloured shapes on a scene background.

nanobooth's toy world. Every image is drawn from a seed by numpy alone, so there are as many
as training wants, they are the same on every machine, and each comes with its factors: the scene and,
per object, shape, colour, size, texture and position. Captions are ordinary English read by the real
CLIP tokenizer ("a small striped red star on the beach"), so a model pretrained here (pretrain.py) is
prompted like Stable Diffusion.

- `sample(seed, index)` -> (PIL image, caption, factors), deterministic in (seed, index).
- `render(factors, rng)` draws given factors (the eval prompts ask for a colour, a shape and a scene).
- `novel_subject(...)`: objects pretraining never shows (two-colour checkered / target patterns), the demo
  subjects of DreamBooth and the other methods.
- `face(identity, index)`, `write_faces(folder, identities, per_identity)`: face-like drawings whose identity
  (skin, hair, eyes, head shape) is fixed and whose pose and expression vary: PhotoVerse's pretraining folder.

Objects are drawn at 2x and averaged down (anti-aliasing), with a dark outline so every colour stands out
on every scene; the colour/scene pairs in `HIDDEN` (a green shape on grass, ...) are never drawn.
Shapes: an image is (64, 64, 3) uint8; coordinates are pixels, x to the right, y down.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64          # image side in pixels
SS = 2             # supersampling factor of the object masks

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond")
COLOURS = {"red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (250, 215, 30), "green": (40, 175, 60),
           "blue": (35, 75, 225), "purple": (135, 55, 195), "pink": (250, 120, 185), "white": (248, 248, 248)}
SCENES = {"grass": "on the grass", "snow": "in the snow", "beach": "on the beach", "sky": "in the sky",
          "night": "at night", "brick wall": "in front of a brick wall", "wooden floor": "on a wooden floor",
          "water": "in the water"}
HIDDEN = {("green", "grass"), ("white", "snow"), ("blue", "sky"), ("blue", "water"), ("red", "brick wall")}
SIZES = {"small": (11.0, 14.0), "large": (15.0, 19.0)}    # object radius range in pixels
TEXTURES = ("plain", "striped", "spotted")                 # pretraining textures; "plain" is left out of captions
TEXTURE_P = (0.8, 0.1, 0.1)
# A shape must be big enough in the latents (16 x 16) to be learnt: with radii 8-11 anywhere in the image and a
# fifth of the images holding two objects, a 4 M-parameter UNet learnt colours and scenes but drew blobs (28%
# shape accuracy); one object of radius 11-19 near the middle in nine images of ten made it learn shapes.
TWO_P = 0.1                # share of images with two objects
CENTRE_JITTER = 6.0        # a lone object's centre lies within this many pixels of the middle
PATTERNS = ("checkered", "target")   # two-colour patterns: never in captions, only in the VAE's extra images


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    texture: str = "plain"
    x: float = 32.0
    y: float = 32.0
    r: float = 12.0
    second_colour: str | None = None   # novel patterns only ("checkered", "target"): their other colour


def valid(colour: str, scene: str) -> bool:
    return (colour, scene) not in HIDDEN

# ----------------------------------------------------------------------------- shapes


def polygon_mask(x, y, vx, vy):
    """Even-odd rule: is each point (x, y) inside the polygon with vertices (vx, vy)?"""
    inside = np.zeros(x.shape, dtype=bool)
    for i in range(len(vx)):
        x1, y1, x2, y2 = vx[i - 1], vy[i - 1], vx[i], vy[i]
        crosses = (y1 > y) != (y2 > y)
        xi = x1 + (y - y1) * (x2 - x1) / (y2 - y1 + 1e-12)
        inside ^= crosses & (x < xi)
    return inside


def shape_mask(shape: str, u, v):
    """Inside-mask of `shape` in unit coordinates (u, v): radius 1, centred at 0, v down."""
    if shape == "circle":
        return u ** 2 + v ** 2 <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.82
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.05
    if shape == "ring":
        return (u ** 2 + v ** 2 <= 1) & (u ** 2 + v ** 2 >= 0.5 ** 2)
    if shape == "cross":
        return ((abs(u) <= 0.34) & (abs(v) <= 1)) | ((abs(v) <= 0.34) & (abs(u) <= 1))
    if shape == "triangle":                      # equilateral, point up
        a = np.deg2rad([-90, 30, 150])
        return polygon_mask(u, v + 0.15, np.cos(a) * 1.15, np.sin(a) * 1.15)
    if shape == "star":                          # five points, inner radius 0.45
        a = np.deg2rad(np.arange(10) * 36 - 90)
        rad = np.where(np.arange(10) % 2 == 0, 1.1, 0.47)
        return polygon_mask(u, v + 0.05, np.cos(a) * rad, np.sin(a) * rad)
    if shape == "heart":                         # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up
        x, y = u * 1.25, -(v * 1.25 - 0.1)
        return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
    raise ValueError(f"unknown shape '{shape}'")


def texture_colour(obj: Obj, u, v) -> np.ndarray:
    """(h, w, 3) float colour of the object's surface at unit coordinates (u, v)."""
    base = np.array(COLOURS[obj.colour], dtype=np.float32)
    other = base * 0.55 if obj.colour != "white" else np.array((150, 150, 165), np.float32)
    if obj.second_colour is not None:
        other = np.array(COLOURS[obj.second_colour], dtype=np.float32)
    if obj.texture == "plain":
        pick = np.zeros(u.shape, bool)
    elif obj.texture == "striped":               # diagonal stripes
        pick = np.floor((u + v) * 2.2) % 2 == 1
    elif obj.texture == "spotted":
        pick = ((u * 2.6 - np.round(u * 2.6)) ** 2 + (v * 2.6 - np.round(v * 2.6)) ** 2) < 0.09
    elif obj.texture == "checkered":             # novel: never in pretraining
        pick = (np.floor(u * 2.2) + np.floor(v * 2.2)) % 2 == 1
    elif obj.texture == "target":                # novel: concentric rings
        pick = np.floor(np.sqrt(u ** 2 + v ** 2) * 3.5) % 2 == 1
    else:
        raise ValueError(f"unknown texture '{obj.texture}'")
    return np.where(pick[..., None], other, base)


def draw_object(img: np.ndarray, obj: Obj) -> None:
    """Paint `obj` onto the float image `img` (in place): a dark outline, then the textured shape."""
    n = SIZE * SS
    c = (np.arange(n, dtype=np.float32) + 0.5) / SS
    y, x = np.meshgrid(c, c, indexing="ij")
    u, v = (x - obj.x) / obj.r, (y - obj.y) / obj.r
    outline = shape_mask(obj.shape, u / 1.12, v / 1.12).astype(np.float32)
    inside = shape_mask(obj.shape, u, v).astype(np.float32)
    colour = texture_colour(obj, u, v)

    def down(a):                                 # (n, n, ...) -> (SIZE, SIZE, ...) by SS x SS averages
        return a.reshape(SIZE, SS, SIZE, SS, *a.shape[2:]).mean(axis=(1, 3))
    a_out, a_in = down(outline)[..., None], down(inside)[..., None]
    col = down(colour * inside[..., None]) / np.maximum(a_in, 1e-6)
    img *= 1 - a_out * 0.75                      # outline: darken what is under the shape's rim
    img[:] = img * (1 - a_in) + col * a_in

# ----------------------------------------------------------------------------- scenes


def scene_background(scene: str, rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) float32 background in 0..255 with a random texture of its own."""
    s = SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    noise = rng.normal(0, 1, (s, s, 1)).astype(np.float32)

    def fill(rgb):
        return np.broadcast_to(np.array(rgb, np.float32), (s, s, 3)).copy()
    if scene == "grass":
        img = fill((70, 140, 50)) + rng.normal(0, 18, (1, s, 1)) + noise * 10     # blades: per-column tint
        img *= (0.8 + 0.2 * yy / s)[..., None]
    elif scene == "snow":
        img = fill((232, 238, 246)) + noise * 5 - (rng.random((s, s, 1)) < 0.04) * np.array((40, 30, 10))
    elif scene == "beach":
        horizon = int(s * rng.uniform(0.25, 0.38))
        img = fill((228, 204, 150)) + noise * 9
        img[:horizon] = np.array((40, 125, 195), np.float32) + noise[:horizon] * 6
        img[horizon:horizon + 2] = (235, 240, 245)                               # surf line
    elif scene == "sky":
        img = fill((95, 165, 240)) + (yy / s)[..., None] * np.array((80, 50, 10), np.float32)
        for _ in range(rng.integers(1, 4)):                                      # clouds
            cx, cy, rx, ry = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(6, 14), rng.uniform(3, 6)
            a = np.clip(1.3 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2, 0, 1)[..., None]
            img = img * (1 - a) + 250 * a
    elif scene == "night":
        img = fill((14, 18, 48)) + noise * 3
        stars = rng.random((s, s)) < 0.02
        img[stars] = rng.uniform(170, 255, (int(stars.sum()), 1))
    elif scene == "brick wall":
        img = fill((200, 196, 186))                                              # mortar
        for row in range(0, s, 8):
            shift = rng.integers(0, 16) if row % 16 else 0
            for col in range(-16, s, 16):
                x0 = col + shift
                tint = np.array((165, 62, 45), np.float32) * rng.uniform(0.8, 1.1)
                img[row + 1:row + 7, max(x0 + 1, 0):max(x0 + 15, 0)] = tint
        img += noise * 6
    elif scene == "wooden floor":
        img = fill((150, 100, 55))
        for row in range(0, s, 11):
            img[row:row + 11] *= rng.uniform(0.8, 1.15)                          # planks
            img[row] *= 0.6                                                      # seams
        img *= (1 + 0.08 * np.sin(xx * rng.uniform(0.3, 0.6) + yy * 1.7))[..., None]  # grain
        img += noise * 4
    elif scene == "water":
        img = fill((30, 90, 160)) + noise * 6
        waves = np.sin(xx * 0.35 + yy * 0.9 + rng.uniform(0, 6.3)) > 0.85
        img[waves] += (60, 70, 70)
    else:
        raise ValueError(f"unknown scene '{scene}'")
    return img.astype(np.float32)

# ----------------------------------------------------------------------------- factors, captions, images


def place(rng: np.random.Generator, size: str, taken: list[Obj] = (), centred: bool = False) -> tuple[float, float, float]:
    """A radius for `size` and a centre inside the image (centred: within CENTRE_JITTER of the middle), apart from
    the objects already `taken`."""
    r = rng.uniform(*SIZES[size])
    if centred:
        x, y = SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
        return float(x), float(y), float(r)
    for _ in range(50):
        x, y = rng.uniform(r + 2, SIZE - r - 2, size=2)
        if all(math.hypot(x - o.x, y - o.y) > r + o.r + 2 for o in taken):
            break
    return float(x), float(y), float(r)


def random_factors(rng: np.random.Generator, two_p: float = TWO_P) -> dict:
    """A scene and one object near the middle (two anywhere, both small, with probability `two_p`), each factor
    uniform over the pretraining world."""
    scene = str(rng.choice(list(SCENES)))
    objects: list[Obj] = []
    n = 2 if rng.random() < two_p else 1
    for _ in range(n):
        colour = str(rng.choice([c for c in COLOURS if valid(c, scene)]))
        size = str(rng.choice(list(SIZES)))
        obj = Obj(str(rng.choice(SHAPES)), colour, size, str(rng.choice(TEXTURES, p=TEXTURE_P)),
                  *place(rng, size if n == 1 else "small", objects, centred=n == 1))
        objects.append(obj if n == 1 else Obj(**{**asdict(obj), "size": "small"}))
    return {"scene": scene, "objects": objects}


def describe(obj: Obj, with_size: bool = True) -> str:
    texture = "" if obj.texture == "plain" else obj.texture + " "
    return f"{obj.size + ' ' if with_size else ''}{texture}{obj.colour} {obj.shape}"


def caption(factors: dict, rng: np.random.Generator) -> str:
    """'a small striped red star on the beach'; the size word is said half the time, the scene 90% of it."""
    parts = [describe(o, with_size=bool(rng.random() < 0.5)) for o in factors["objects"]]
    text = "a " + " and a ".join(parts)
    return text + " " + SCENES[factors["scene"]] if rng.random() < 0.9 else text


def render(factors: dict, rng: np.random.Generator) -> np.ndarray:
    """Draw `factors` ({"scene", "objects"}); the scene's texture is drawn from `rng`."""
    img = scene_background(factors["scene"], rng)
    for obj in factors["objects"]:
        draw_object(img, obj)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def sample(seed: int, index: int) -> tuple[Image.Image, str, dict]:
    """The world's image number `index` of stream `seed`: (image, caption, factors)."""
    rng = np.random.default_rng([seed, index])
    factors = random_factors(rng)
    return Image.fromarray(render(factors, rng)), caption(factors, rng), factors


def image_of(shape: str, colour: str, scene: str, rng: np.random.Generator, size: str | None = None,
             texture: str = "plain", second_colour: str | None = None, with_mask: bool = False):
    """One object of the given factors (size random unless given) at a random place on `scene`; with_mask: also
    its silhouette, outline included (white on black, mode L), the object-driven method's mask."""
    size = size or str(rng.choice(list(SIZES)))
    obj = Obj(shape, colour, size, texture, *place(rng, size), second_colour=second_colour)
    image = Image.fromarray(render({"scene": scene, "objects": [obj]}, rng))
    if not with_mask:
        return image
    c = np.arange(SIZE, dtype=np.float32) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    mask = shape_mask(obj.shape, (x - obj.x) / (obj.r * 1.12), (y - obj.y) / (obj.r * 1.12))
    return image, Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def pattern_sample(seed: int, index: int) -> np.ndarray:
    """An image for the autoencoder only: one shape of a random size and place in a two-colour PATTERNS texture of
    a random colour pair. The VAE is a generic image codec, as SD's is trained on far more than SD draws; these
    teach it to keep fine two-colour detail, which the UNet and its captions never see."""
    rng = np.random.default_rng([seed, index, 6700417])
    scene, size = str(rng.choice(list(SCENES))), str(rng.choice(list(SIZES)))
    first, second = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    obj = Obj(str(rng.choice(SHAPES)), first, size, str(rng.choice(PATTERNS)), *place(rng, size), second_colour=second)
    return render({"scene": scene, "objects": [obj]}, rng)


def batch(seed: int, start: int, n: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """Images start..start+n-1 of stream `seed`: (n, SIZE, SIZE, 3) uint8, captions, factors."""
    rows = [sample(seed, i) for i in range(start, start + n)]
    return np.stack([np.asarray(im) for im, _, _ in rows]), [c for _, c, _ in rows], [f for _, _, f in rows]

# ----------------------------------------------------------------------------- demo subjects

# Objects pretraining never shows: two-colour patterns. Each is a DreamBooth subject whose class word is its
# shape ("a sks star"); the class prompt draws the world's plain or lightly patterned stars of any colour.
NOVEL_SUBJECTS = {
    "checkered_star": dict(shape="star", colour="yellow", texture="checkered", second_colour="purple"),
    "target_heart": dict(shape="heart", colour="white", texture="target", second_colour="red"),
    "checkered_circle": dict(shape="circle", colour="orange", texture="checkered", second_colour="blue"),
}


def novel_subject(name: str, n: int, seed: int = 0, with_masks: bool = False) -> list:
    """`n` images of a novel subject, large, at random places in scenes chosen in turn from the world
    (with_masks: (image, mask) pairs, see image_of)."""
    rng = np.random.default_rng([seed, 7919])
    scenes = [s for s in SCENES if s not in ("night",)]
    return [image_of(scene=scenes[(i * 3) % len(scenes)], rng=rng, size="large", with_mask=with_masks,
                     **NOVEL_SUBJECTS[name]) for i in range(n)]


def eval_prompts(n: int = 100, seed: int = 0) -> list[tuple[str, dict]]:
    """`n` prompts "a {colour} {shape} {scene}" with their factors, every (colour, shape, scene) pair valid."""
    rng = np.random.default_rng([seed, 104729])
    out = []
    while len(out) < n:
        shape, colour, scene = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(list(SCENES)))
        if valid(colour, scene):
            out.append((f"a {colour} {shape} {SCENES[scene]}", {"shape": shape, "colour": colour, "scene": scene}))
    return out

# ----------------------------------------------------------------------------- faces (PhotoVerse's pretraining)

# A face-like drawing per (identity, index). The identity fixes what a face encoder should recognise: skin, hair
# colour and style, eye colour, the head's width and chin, where the eyes sit; the index varies what it should
# not: position, scale, expression, the background's tint and the shirt.
SKIN_TONES = ((255, 224, 196), (241, 194, 155), (224, 172, 125), (198, 134, 86), (160, 100, 60), (110, 70, 45))
HAIR_COLOURS = ((25, 20, 18), (85, 50, 25), (150, 95, 45), (215, 175, 95), (170, 60, 30), (150, 150, 155),
                (235, 230, 215))
EYE_COLOURS = ((70, 45, 25), (45, 95, 180), (55, 130, 75), (110, 110, 120))
HAIR_STYLES = ("short", "long", "fringe", "curly", "bun", "bald")


@dataclass(frozen=True)
class Face:
    skin: tuple
    hair: tuple
    eyes: tuple
    hair_style: str
    width: float        # head half-width / half-height
    chin: float         # 0: an oval head, larger: a narrower, pointed chin
    eye_gap: float      # eye centres at u = +-eye_gap (head units)
    eye_height: float   # eye centres at v = eye_height


def face_identity(identity: int) -> Face:
    """What stays the same in every image of `identity`, drawn from its own stream."""
    rng = np.random.default_rng([identity, 524287])

    def pick(options):
        return options[rng.integers(len(options))]
    return Face(pick(SKIN_TONES), pick(HAIR_COLOURS), pick(EYE_COLOURS), pick(HAIR_STYLES),
                float(rng.uniform(0.72, 0.92)), float(rng.uniform(0.0, 0.35)), float(rng.uniform(0.34, 0.46)),
                float(rng.uniform(-0.2, 0.0)))


def face_layers(f: Face, u, v, smile: float = 0.0, shirt=(128, 128, 128)) -> list[tuple[str, np.ndarray, tuple]]:
    """The parts of face `f` in painting order, each (name, inside-mask, rgb), at head units (u, v): the head is
    u^2 + v^2 <= 1 (u across, v down). A later part covers an earlier one. face_and_box paints them; face_id.py
    renders them to read a drawn face's identity factors where they are."""
    layers = []

    def part(name, mask, rgb):
        layers.append((name, mask, tuple(float(c) for c in rgb)))

    def ellipse(u0, v0, ru, rv):
        return ((u - u0) / ru) ** 2 + ((v - v0) / rv) ** 2 <= 1
    head = (u / (1 - f.chin * np.clip(v, 0, 1))) ** 2 + v ** 2 <= 1      # the chin narrows the lower half
    hair_line = 1.12 + (0.07 * np.sin(9 * np.arctan2(v, u)) if f.hair_style == "curly" else 0)

    # 1. behind the head: long hair, neck and shoulders, ears
    if f.hair_style == "long":
        part("long hair", ellipse(0, 0.1, 1.25, 1.15) & (v < 1.0), f.hair)
    part("neck", (abs(u) < 0.38) & (v > 0.6) & (v < 1.35), np.array(f.skin) * 0.9)
    part("shirt", ellipse(0, 2.0, 2.1, 0.75), shirt)
    part("ears", ellipse(-1.0, 0.0, 0.16, 0.22) | ellipse(1.0, 0.0, 0.16, 0.22), np.array(f.skin) * 0.92)
    # 2. the head, then the hair over its top
    part("head", head, f.skin)
    if f.hair_style == "bun":
        part("bun", ellipse(0, -1.15, 0.38, 0.3), f.hair)
    cap = (u / hair_line) ** 2 + ((v + 0.04) / hair_line) ** 2 <= 1
    top = {"short": v < -0.5, "long": v < -0.45, "curly": v < -0.4, "bun": v < -0.55,
           "fringe": v < -0.42 + 0.12 * (abs(u) > 0.55), "bald": (abs(u) > 0.8) & (v < 0.05) & (v > -0.5)}
    part("hair", cap & top[f.hair_style], f.hair)
    # 3. the features: eyebrows (the hair's colour), eyes (whites, iris, pupil), nose, mouth
    brow_v = f.eye_height - 0.2
    brows = (abs(abs(u) - f.eye_gap) < 0.17) & (abs(v - brow_v + 0.15 * (abs(u) - f.eye_gap) ** 2) < 0.035)
    part("brows", brows, np.array(f.hair) * 0.8 if f.hair_style != "bald" else np.array(f.skin) * 0.6)
    for side in (-1, 1):
        eu = side * f.eye_gap
        part("eye whites", ellipse(eu, f.eye_height, 0.17, 0.08), (245, 245, 245))
        iris = ellipse(eu, f.eye_height, 0.085, 0.08)
        part("iris", iris, f.eyes)
        part("pupil", iris & ellipse(eu, f.eye_height, 0.04, 0.04), (15, 15, 15))
    nose = polygon_mask(u, v, np.array([0.0, -0.1, 0.1]), np.array([f.eye_height + 0.1, 0.3, 0.3]))
    part("nose", nose, np.array(f.skin) * 0.82)
    mouth_v = 0.52 + 0.12 * smile * (1 - (u / 0.3) ** 2) - 0.06 * smile   # smile > 0: the corners lift
    part("mouth", (abs(u) < 0.3) & (abs(v - mouth_v) < 0.045), (150, 45, 55))
    return layers


def face_pose(identity: int, index: int) -> dict:
    """What image `index` of `identity` varies: the head's offset (dx, dy) from (32, 31) and scale (half-height
    19 * scale), the smile, the background tint and the shirt colour."""
    rng = np.random.default_rng([identity, index, 15485863])
    dx, dy = rng.uniform(-2.5, 2.5, size=2)
    scale, smile = rng.uniform(0.93, 1.07), rng.uniform(-0.6, 1.0)      # smile < 0: a frown
    tint = np.array((200, 205, 215)) + rng.uniform(-12, 12, size=3)     # a pale background of its own tint
    shirt = np.array(COLOURS[str(rng.choice(list(COLOURS)))]) * 0.5 + 60    # muted
    return dict(dx=float(dx), dy=float(dy), scale=float(scale), smile=float(smile), tint=tint, shirt=shirt)


def head_units(f: Face, dx: float, dy: float, scale: float, n: int, ss: int):
    """Head units (u, v) at the centres of an n x n grid of 1/ss-pixel cells, for a head offset by (dx, dy) from
    (32, 31) with half-height 19 * scale; and the head's box [left, top, right, bottom] in pixels."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / ss
    y, x = np.meshgrid(c, c, indexing="ij")
    cx, cy, b = 32 + dx, 31 + dy, 19 * scale                             # head centre, half-height
    a = b * f.width                                                      # half-width
    box = [max(0, math.floor(cx - a)), max(0, math.floor(cy - b)), min(SIZE, math.ceil(cx + a)),
           min(SIZE, math.ceil(cy + b))]
    return (x - cx) / a, (y - cy) / b, box


def face_and_box(identity: int, index: int) -> tuple[Image.Image, list[int]]:
    """Image `index` of face `identity` and its head's box [left, top, right, bottom] in pixels (hair excluded)."""
    return draw_face(face_identity(identity), face_pose(identity, index))


def draw_face(f: Face, pose: dict) -> tuple[Image.Image, list[int]]:
    """Face `f` drawn in `pose` (face_pose's keys), and its head's box: face_and_box for any Face."""
    n = SIZE * SS
    u, v, box = head_units(f, pose["dx"], pose["dy"], pose["scale"], n, SS)
    y = (np.arange(n, dtype=np.float32)[:, None, None] + 0.5) / SS
    img = np.broadcast_to(pose["tint"] * (1 - 0.15 * y / SIZE), (n, n, 3)).astype(np.float32)  # darker downwards
    for _, mask, rgb in face_layers(f, u, v, pose["smile"], pose["shirt"]):
        img[mask] = np.asarray(rgb, np.float32)
    out = img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))            # SS x SS averages: anti-aliasing
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8)), box


def face(identity: int, index: int) -> Image.Image:
    """Image `index` of the face `identity` (64x64): deterministic in (identity, index)."""
    return face_and_box(identity, index)[0]


def write_faces(folder, identities, per_identity: int) -> list[Path]:
    """An aligned-face folder for PhotoVerse's pretraining (`train.py --method photoverse --instance_data_dir
    folder`): `IDENTITY_INDEX.png` for each of `identities` (an iterable of ints) and `per_identity` indices, and
    `boxes.json` with each head's box, the face region of PhotoVerse's L_face (photoverse_train.FaceFolder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, boxes = [], {}
    for identity in identities:
        for index in range(per_identity):
            image, box = face_and_box(identity, index)
            path = folder / f"{identity:04d}_{index:03d}.png"
            image.save(path)
            paths.append(path)
            boxes[path.name] = box
    (folder / "boxes.json").write_text(json.dumps(boxes))
    return paths


if __name__ == "__main__":   # python world.py [OUT.png]: a contact sheet of the first 64 images and their captions
    import argparse            # python world.py --faces DIR: a face folder for PhotoVerse's pretraining
    p = argparse.ArgumentParser(description="Draw the toy world: a contact sheet, or a folder of faces.")
    p.add_argument("sheet", nargs="?", default="world.png")
    p.add_argument("--faces", help="write an aligned-face folder here instead (see write_faces)")
    p.add_argument("--identities", type=int, default=200)
    p.add_argument("--per_identity", type=int, default=8)
    args = p.parse_args()
    if args.faces:
        paths = write_faces(args.faces, range(args.identities), args.per_identity)
        print(f"{len(paths)} faces of {args.identities} identities in {args.faces}")
    else:
        sheet = Image.new("RGB", (8 * SIZE, 8 * SIZE))
        for i in range(64):
            im, cap, _ = sample(0, i)
            sheet.paste(im, ((i % 8) * SIZE, (i // 8) * SIZE))
            print(i, cap)
        sheet.save(args.sheet)
