"""How a picture file becomes pixels, the same for every image family and for a user's own episodes: any mode PIL
reads, 16-bit grayscale scaled to 8 bits (PIL's own conversion clips it at 255: an almost white image), and
transparency composited onto white (a drawing exported with a transparent background keeps its strokes; dropping
the alpha turns it all into ink)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dif_maml_dist.messages import first_line


def read_image(path: Path, channels: int):
    """The image at ``path`` as a PIL image in mode ``L`` (``channels`` 1) or ``RGB`` (3). ``ValueError`` naming
    the file when PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16- or 32-bit grayscale
                wide = np.asarray(img, dtype=np.float64)
                scale = 257.0 if img.mode.startswith("I;16") or wide.max() > 255 else 1.0
                img = Image.fromarray(np.clip(np.rint(wide / scale), 0, 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return img.convert("L" if channels == 1 else "RGB")
    except Image.DecompressionBombError as err:  # not an OSError; a picture too large to decode safely
        raise ValueError(f"image {path} is over PIL's decompression-bomb limit ({str(err).split(',')[0]}); "
                         f"downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {first_line(err)}; delete or replace the file") from None


def decode(path: Path, channels: int, size: int, invert: bool = False) -> np.ndarray:
    """One image as uint8 ``[channels, size, size]``: :func:`read_image`, resized, and with ``invert`` turned to
    255 - pixel (dark strokes on light paper become bright on dark, as task=omniglot decodes its drawings)."""
    from PIL import Image

    pixels = np.asarray(read_image(path, channels).resize((size, size), Image.LANCZOS), dtype=np.uint8)
    if invert:
        pixels = 255 - pixels
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
