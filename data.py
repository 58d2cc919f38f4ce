"""Images in and out: read any image file as RGB, resize, crop, flip, and map to [-1, 1]; write PNGs and grids.

Users hand DreamBooth whatever their phone or the web gave them, so every PIL mode is accepted: EXIF
rotation is applied, transparency (RGBA, LA, P with a transparent colour) is composited on white,
16-bit greyscale is scaled to 8 bits, CMYK/L/P are converted. A file that cannot be read is an error
naming it, raised before training starts.

Generated images go out as PNGs with their settings in text chunks, AUTOMATIC1111's `parameters` among them
(`a1111_parameters`), which its PNG Info tab, Civitai and ComfyUI read; `png_text` reads them back.

Shapes: a prepared image is (3, R, R) float32 in [-1, 1].
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from hub import atomic_write

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
    """The text chunks of a PNG (`save_png` writes the prompt, the seed, ...); {} for other images."""
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


# ----------------------------------------------------------------------------- writing

def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(b, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers' `numpy_to_pil` does."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]


def save_png(image: Image.Image, path: Path, meta: dict) -> None:
    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info))


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


A1111_SAMPLERS = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp": "DPM++ 2M", "euler": "Euler"}   # the names A1111 shows for ours


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, guidance: float, seed: int,
                     width: int, height: int, extra: dict | None = None) -> str:
    """The `parameters` text chunk AUTOMATIC1111's web UI writes, which its PNG Info tab, Civitai and ComfyUI read:
    the prompt, a `Negative prompt:` line (when there is one), then `Steps: N, Sampler: ..., CFG scale: ...,
    Seed: ..., Size: WxH` and more `key: value` pairs (a value with a comma, colon or newline JSON-quoted, as
    A1111 does)."""
    def quote(v):
        v = str(v)
        return json.dumps(v) if any(c in v for c in ",:\n") else v
    pairs = {"Steps": steps, "Sampler": A1111_SAMPLERS.get(sampler, sampler), "CFG scale": guidance, "Seed": seed,
             "Size": f"{width}x{height}", **{k: v for k, v in (extra or {}).items() if v not in (None, "")}}
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{k}: {quote(v)}" for k, v in pairs.items())])
