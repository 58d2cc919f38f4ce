"""Training images: read any image file as RGB, resize, crop, flip, and map to [-1, 1].

Users hand DreamBooth whatever their phone or the web gave them, so every PIL mode is accepted: EXIF
rotation is applied, transparency (RGBA, LA, P with a transparent colour) is composited on white,
16-bit greyscale is scaled to 8 bits, CMYK/L/P are converted. A file that cannot be read is an error
naming it, raised before training starts.

Shapes: a prepared image is (3, R, R) float32 in [-1, 1].
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder, what: str = "instance") -> list[Path]:
    """The image files of a folder, sorted; a clear error if the folder is missing or has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--{what}_data_dir '{folder}' does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise ValueError(f"--{what}_data_dir '{folder}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def png_text(path) -> dict:
    """The text chunks of a PNG (sample.save_png writes the prompt, the seed, ...); {} for other images."""
    if Path(path).suffix.lower() != ".png":
        return {}
    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image '{path}': {e}") from None


def load_image(path) -> Image.Image:
    """Open an image file of any mode as 8-bit RGB."""
    try:
        im = Image.open(path)
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image '{path}': {e}") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):             # 16/32-bit greyscale: scale to 0..255
        a = np.asarray(im).astype(np.float32)
        a = a / 257.0 if a.max() > 255 else a
        im = Image.fromarray(a.clip(0, 255).round().astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):                          # transparency: composite on white
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def prepare(im: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize the short side to `resolution` (bilinear, as diffusers' DreamBooth script), crop a square
    (center, or at a random place drawn from `generator`), optionally mirror, and map to [-1, 1]."""
    return prepare_with_crop(im, resolution, center_crop, flip, generator)[0]


def prepare_with_crop(im: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """`prepare`, and the crop's top-left corner (top, left) in the resized image, mirrored with it (the corner
    diffusers' SDXL DreamBooth script measures, flipping before it crops): SDXL's crop micro-conditioning."""
    w, h = im.size
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, R, R)
    return (x.flip(-1), (top, w - resolution - left)) if flip else (x, (top, left))
