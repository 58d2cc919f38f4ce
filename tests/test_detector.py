"""detector.py: the toy world's render-and-compare detector finds what is drawn and nothing else.

Real renders from world.py, where the answer is known: every demo subject in every scene at both sizes must be
found (>= 95%), and empty scenes, plain shapes in a subject's colours and the other subjects must not pass for it
(<= 5%). Shapes in the asked colour are named right on real renders, and an empty scene holds no object.
"""
import numpy as np
import pytest

import detector
import world

SCENES = list(world.SCENES)


def subject_renders(name: str, per_cell: int = 2, seed: int = 0):
    """`name` in every scene, small and large, `per_cell` random places each."""
    rng, spec = np.random.default_rng([seed, 11]), world.NOVEL_SUBJECTS[name]
    return [world.image_of(scene=scene, rng=rng, size=size, **spec)
            for scene in SCENES for size in world.SIZES for _ in range(per_cell)]


@pytest.mark.parametrize("name", list(world.NOVEL_SUBJECTS))
def test_finds_each_subject_in_every_scene_and_size(name):
    images = subject_renders(name)
    found = [detector.subject_present(im, name)["present"] for im in images]
    assert np.mean(found) >= 0.95, f"{name}: found in {np.mean(found):.0%} of {len(images)} renders"


@pytest.mark.parametrize("name", list(world.NOVEL_SUBJECTS))
def test_subject_not_found_in_empty_scenes_plain_shapes_or_other_subjects(name):
    rng, spec = np.random.default_rng(5), world.NOVEL_SUBJECTS[name]
    empty = [world.render({"scene": scene, "objects": []}, rng) for scene in SCENES for _ in range(5)]
    # the subject's own shape in either of its colours, plain and with the world's textures
    plain = [world.image_of(spec["shape"], colour, scene, rng, texture=texture)
             for colour in (spec["colour"], spec["second_colour"]) for scene in SCENES
             for texture in world.TEXTURES if world.valid(colour, scene)]
    others = [im for other in world.NOVEL_SUBJECTS if other != name for im in subject_renders(other, per_cell=1)]
    for label, images in (("empty scenes", empty), ("plain shapes in its colours", plain), ("other subjects", others)):
        fired = np.mean([detector.subject_present(im, name)["present"] for im in images])
        assert fired <= 0.05, f"{name} found in {fired:.0%} of {len(images)} {label}"


def test_names_the_shape_of_each_colour_on_real_renders():
    rng = np.random.default_rng(3)
    right, n = 0, 0
    for i, (shape, colour, scene) in enumerate((s, c, sc) for s in world.SHAPES for c in world.COLOURS for sc in SCENES):
        if i % 3 or not world.valid(colour, scene):
            continue
        found = detector.detect(world.image_of(shape, colour, scene, rng), colour)
        right, n = right + (found["present"] and found["shape"] == shape), n + 1
    assert right / n >= 0.97, f"{right}/{n}"


def test_an_empty_scene_or_the_wrong_colour_is_no_object():
    rng = np.random.default_rng(4)
    empty = [world.render({"scene": scene, "objects": []}, rng) for scene in SCENES for _ in range(10)]
    assert np.mean([detector.detect_any(im)["present"] for im in empty]) <= 0.05
    red_star = world.image_of("star", "red", "snow", rng)
    assert detector.detect(red_star, "red")["shape"] == "star"
    assert not detector.detect(red_star, "blue")["present"]


def test_fit_finds_a_drawn_silhouette_where_it_is():
    mask = detector.silhouette_at("heart", 30, 34, 14)
    best = detector.fit(mask)
    assert best["shape"] == "heart" and best["iou"] > 0.99 and (best["x"], best["y"], best["r"]) == (30, 34, 14)


def test_detect_any_finds_objects_of_several_colours_and_no_object_in_empty_scenes():
    """A class prompt ("a star") draws stars that mix colours; detect_any's foreground fit finds them whole. Real
    renders of two-colour checkered and striped objects stand in for them here (the one-colour masks alone found
    the star in 3 of 24 generated "a star ..." images, the foreground fit in 20); the empty scenes of every scene
    must still hold no object."""
    rng = np.random.default_rng(6)
    right, n = 0, 0
    for i, (shape, colour, scene) in enumerate((s, c, sc) for s in world.SHAPES for c in world.COLOURS for sc in SCENES):
        if i % 2 or not world.valid(colour, scene):
            continue
        second = [c for c in world.COLOURS if c != colour][i % (len(world.COLOURS) - 1)]
        texture = ("checkered", "target", "striped", "spotted")[i % 4]
        image = world.image_of(shape, colour, scene, rng, texture=texture, second_colour=second)
        right, n = right + (detector.detect_any(image)["shape"] == shape), n + 1
    assert right / n >= 0.8, f"{right}/{n}"    # measured 216/248 (87%): stripes in a colour of the scene break it up
    empty = [world.render({"scene": scene, "objects": []}, rng) for scene in SCENES for _ in range(6)]
    assert np.mean([detector.detect_any(im)["present"] for im in empty]) <= 0.05   # measured 1/48: a cloud
