"""data.py: every image mode becomes RGB, crops and flips, clear errors naming the file."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import list_images, load_image, prepare


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))              # fully transparent red -> white
    rgba.putpixel((0, 0), (0, 0, 255, 255))                       # one opaque blue pixel stays blue
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (4, 4), 100).save(tmp_path / "l.png")
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    p.save(tmp_path / "p.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")   # CMYK red
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit white
    out = {f.name: np.asarray(load_image(f)) for f in sorted(tmp_path.iterdir())}
    assert all(a.dtype == np.uint8 and a.shape == (4, 4, 3) for a in out.values())
    assert out["rgba.png"][1, 1].tolist() == [255, 255, 255] and out["rgba.png"][0, 0].tolist() == [0, 0, 255]
    assert out["l.png"][0, 0].tolist() == [100, 100, 100]
    assert out["p.png"][0, 0].tolist() == [10, 20, 30]
    r, g, b = out["cmyk.jpg"][2, 2].tolist()
    assert r > 200 and g < 60 and b < 60
    assert out["deep.png"][0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (6, 2), "red")
    exif = Image.Exif()
    exif[0x0112] = 6                                                # orientation: rotate 90 degrees
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (2, 6)


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(tmp_path / "broken.png")


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no images"):
        list_images(tmp_path)


def test_prepare_crops_flips_and_scales():
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :20] = 255                                                  # left half white
    im = Image.fromarray(a)
    x = prepare(im, 8, center_crop=True)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(prepare(im, 8, True, flip=True), x.flip(-1))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(prepare(im, 8, False, generator=g1), prepare(im, 8, False, generator=g2))
    left = prepare(im, 10, center_crop=False, generator=torch.Generator().manual_seed(1))
    assert left.shape == (3, 10, 10)
