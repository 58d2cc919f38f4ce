"""world.py: the procedural captioned world is deterministic, its captions tell the truth about its factors, the
hidden colour/scene pairs and the novel textures never appear, and the faces keep their identity."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import world

N = 300     # samples looked at by the statistical tests


@pytest.fixture(scope="module")
def samples():
    return [world.sample(0, i) for i in range(N)]


def pixels(image):
    return np.asarray(image).astype(np.float32)

# ----------------------------------------------------------------------------- the captioned world


def test_sample_is_deterministic_in_seed_and_index():
    a, b = world.sample(3, 17), world.sample(3, 17)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1] and a[2] == b[2]
    assert a[0].size == (world.SIZE, world.SIZE) and a[0].mode == "RGB"
    for other in (world.sample(3, 18), world.sample(4, 17)):
        assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))
    images, captions, factors = world.batch(3, 16, 3)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images[1], np.asarray(a[0])) and captions[1] == a[1] and factors[1] == a[2]


def test_captions_agree_with_factors(samples):
    with_scene = 0
    for _, caption, f in samples:
        for o in f["objects"]:
            described = rf"\b(?:{o.size} )?{'' if o.texture == 'plain' else o.texture + ' '}{o.colour} {o.shape}\b"
            assert re.search(rf"\ba {described}", caption), (caption, o)
        assert caption.count(" and a ") == len(f["objects"]) - 1
        said = [scene for scene, phrase in world.SCENES.items() if caption.endswith(" " + phrase)]
        assert said in ([], [f["scene"]]), (caption, f["scene"])
        with_scene += bool(said)
    assert 0.8 * N < with_scene < N                         # the scene is said 90% of the time
    assert any(len(f["objects"]) == 2 for _, _, f in samples)


def test_pixels_agree_with_factors(samples):
    """A plain object's centre pixel has its colour (nearest of COLOURS); rings have a hole, so are skipped."""
    checked = 0
    names, rgb = list(world.COLOURS), np.array(list(world.COLOURS.values()), np.float32)
    for image, _, f in samples:
        for o in f["objects"]:
            if o.texture == "plain" and o.shape != "ring":
                centre = pixels(image)[int(o.y), int(o.x)]
                assert names[np.abs(rgb - centre).sum(-1).argmin()] == o.colour, (o, centre)
                checked += 1
    assert checked > N / 2


def test_hidden_pairs_never_occur(samples):
    seen = {(o.colour, f["scene"]) for _, _, f in samples for o in f["objects"]}
    assert not seen & world.HIDDEN
    colours, scenes = {c for c, _ in world.HIDDEN}, {s for _, s in world.HIDDEN}
    assert colours <= {c for c, _ in seen} and scenes <= {s for _, s in seen}   # both halves do occur, apart
    assert {o.texture for _, _, f in samples for o in f["objects"]} == set(world.TEXTURES)


def test_shape_masks_have_plausible_areas_and_differ():
    u = np.linspace(-1.5, 1.5, 301, dtype=np.float32)
    v, u = np.meshgrid(u, u, indexing="ij")
    masks = {s: world.shape_mask(s, u, v) for s in world.SHAPES}
    for s, m in masks.items():
        area = m.mean() * 3.0 ** 2                          # in units of r^2; the unit circle is pi
        assert 1.2 < area < 3.3, (s, area)
    for i, a in enumerate(world.SHAPES):
        for b in world.SHAPES[i + 1:]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.85, (a, b, iou)
    with pytest.raises(ValueError, match="unknown shape"):
        world.shape_mask("hexagon", u, v)


def test_objects_stay_inside_the_image(samples):
    """At most 2% of an object's body lies outside the image (the triangle's apex, 1.3 r above its centre, can
    poke out by a pixel: place() keeps r + 2 px from the border)."""
    c = np.arange(-24, 88, 0.5, dtype=np.float32) + 0.25
    y, x = np.meshgrid(c, c, indexing="ij")
    outside = (x < 0) | (x > world.SIZE) | (y < 0) | (y > world.SIZE)
    for _, _, f in samples[:100]:
        for o in f["objects"]:
            body = world.shape_mask(o.shape, (x - o.x) / o.r, (y - o.y) / o.r)
            assert (body & outside).sum() <= 0.02 * body.sum(), o
            assert world.SIZES[o.size][0] <= o.r <= world.SIZES[o.size][1]


def test_eval_prompts_are_valid_and_deterministic():
    prompts = world.eval_prompts(50, seed=1)
    assert len(prompts) == 50 and prompts == world.eval_prompts(50, seed=1) != world.eval_prompts(50, seed=2)
    for prompt, f in prompts:
        assert f["shape"] in world.SHAPES and f["colour"] in world.COLOURS and f["scene"] in world.SCENES
        assert world.valid(f["colour"], f["scene"])
        assert prompt == f"a {f['colour']} {f['shape']} {world.SCENES[f['scene']]}"
    assert len({p for p, _ in prompts}) > 40


def test_novel_subjects_are_deterministic_and_never_in_pretraining(samples):
    pretraining = {o.texture for _, _, f in samples for o in f["objects"]}
    for name, subject in world.NOVEL_SUBJECTS.items():
        assert subject["texture"] not in world.TEXTURES and subject["texture"] not in pretraining
        a, b = world.novel_subject(name, 3), world.novel_subject(name, 3)
        assert len(a) == 3 and all(im.size == (64, 64) for im in a)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
        assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
        assert not np.array_equal(np.asarray(a[0]), np.asarray(world.novel_subject(name, 1, seed=1)[0]))

# ----------------------------------------------------------------------------- faces


def test_faces_are_deterministic():
    a = world.face(5, 2)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(world.face(5, 2)))
    assert not np.array_equal(np.asarray(a), np.asarray(world.face(5, 3)))
    assert world.face_identity(5) == world.face_identity(5) != world.face_identity(6)


def test_identities_differ_more_than_images_of_one_identity():
    """Mean absolute pixel distance, over the whole image and over its centre (the face; pose, background and
    shirt vary within an identity, so the whole image's margin is smaller)."""
    images = np.stack([[pixels(world.face(i, k)) for k in range(4)] for i in range(12)])   # (identity, index, ...)
    for crop, margin in ((slice(None), 1.4), (slice(16, 48), 2.5)):
        x = images[:, :, crop, crop]
        within = np.mean([np.abs(x[i, k] - x[i, m]).mean() for i in range(12) for k in range(4) for m in range(k)])
        between = np.mean([np.abs(x[i, k] - x[j, k]).mean() for k in range(4) for i in range(12) for j in range(i)])
        assert between > margin * within, (crop, between, within)
    assert {world.face_identity(i).hair_style for i in range(100)} == set(world.HAIR_STYLES)


def test_write_faces_makes_photoverses_face_folder(tmp_path):
    from photoverse_train import FaceFolder
    paths = world.write_faces(tmp_path / "faces", [3, 40], 2)
    assert [p.name for p in paths] == ["0003_000.png", "0003_001.png", "0040_000.png", "0040_001.png"]
    assert np.array_equal(pixels(world.face(40, 1)), pixels(Image.open(paths[3])))
    boxes = json.loads((tmp_path / "faces" / "boxes.json").read_text())
    assert set(boxes) == {p.name for p in paths}
    faces = FaceFolder(tmp_path / "faces")
    assert len(faces) == 4
    x, mask = faces.load(0, 64)
    assert x.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    assert 0.15 < mask.mean() < 0.6                          # the head, not the whole image


def test_novel_subject_masks_cover_the_object():
    pairs = world.novel_subject("checkered_star", 3, with_masks=True)
    plain = world.novel_subject("checkered_star", 3)
    colours = np.array([world.COLOURS["yellow"], world.COLOURS["purple"]], dtype=np.float32)
    for (image, mask), same in zip(pairs, plain):
        assert np.array_equal(np.asarray(image), np.asarray(same))          # the mask does not change the image
        a, m = np.asarray(image).astype(np.float32), np.asarray(mask) > 127
        near = (np.abs(a[:, :, None, :] - colours).max(-1) < 40).any(-1)    # a subject colour
        assert 0.05 < m.mean() < 0.5
        assert near[m].mean() > 0.6 and near[~m].mean() < 0.02
