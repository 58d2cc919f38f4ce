"""DreamBooth works on the shipped toy model: the demo's training (`train.py --demo`: prior preservation, 300
steps at 64 px on five photos of a checkered star), then scored as the demo scores it, by detector.py's
render-and-compare answers (an empty scene cannot pass for the subject) and the factor classifier's scene.

- "a sks star {scene}" draws the subject, in scenes the five photos never show, and in the asked scene;
- "a star {scene}" still draws stars, and not the subject.
The first is a target the demo does not reach yet (measured numbers in its xfail reason and the README); the
second holds (a star in 8 of 8 class images, the subject in none, with detector.detect_any's foreground fit).
"""
import json

import pytest

import train

pytestmark = pytest.mark.skipif(not (train.TOY / "model" / "model_index.json").is_file(),
                                reason="the shipped toy model (assets/toy) is missing")


def prompt_rows(out):
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    subject = [r for r in metrics["prompts"] if " sks " in f" {r['prompt']} "]
    cls = [r for r in metrics["prompts"] if " sks " not in f" {r['prompt']} "]
    return subject, cls


def mean(rows, key):
    return sum(r[key] * r["num_images"] for r in rows) / sum(r["num_images"] for r in rows)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_dreambooth")
    train.main(["--demo", "--class_data_dir", str(root / "classes"), "--output_dir", str(root / "demo")])
    return root / "demo"


@pytest.mark.xfail(reason="not reached: measured with the demo's lr 2e-4 and guidance 7, 'a sks star' in the snow / at "
                   "night / in front of a brick wall drew the subject (detector) in 1 / 3 / 0 of 4 images on a fresh "
                   "clone (2 / 2 / 0 in a sweep), scene right 100 / 100 / 100%: small faint stars on the brick wall", strict=False)
def test_subject_prompts_draw_the_subject_in_the_asked_scene(demo):
    subject, _ = prompt_rows(demo)
    assert len(subject) == len(train.DEMO_SCENES)
    print(f"'a sks star' prompts: subject drawn {mean(subject, 'subject_present'):.2f}, "
          f"scene right {mean(subject, 'scene_acc'):.2f}")
    assert mean(subject, "subject_present") >= 0.8
    assert mean(subject, "scene_acc") >= 0.9


def test_class_prompts_draw_stars_that_are_not_the_subject(demo):
    _, cls = prompt_rows(demo)
    assert len(cls) >= 1
    print(f"'a star' prompts: a star drawn {mean(cls, 'shape_present'):.2f}, "
          f"the subject {mean(cls, 'subject_present'):.2f}")
    assert mean(cls, "shape_present") >= 0.8
    assert mean(cls, "subject_present") <= 0.2
