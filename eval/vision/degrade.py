"""Scan-like degradations of a 300 dpi page: a tilt, resampling to the scanner's resolution,
blur, grey noise and JPEG compression, in that order (the order a scanner or a phone applies
them). Noise comes from a numpy generator seeded per page and degradation: every run of the
evaluation sees the same pixels."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from eval.vision.corpus import DPI


@dataclass(frozen=True, slots=True)
class Degradation:
    name: str
    dpi: int
    rotate: float = 0.0  # degrees, counter-clockwise
    noise: float = 0.0  # standard deviation of Gaussian grey noise, in grey levels
    blur: float = 0.0  # Gaussian blur radius in pixels (at the output resolution)
    jpeg: int | None = None  # JPEG quality; None: PNG

    @property
    def noisy(self) -> bool:
        return self.noise > 0 or self.blur > 0 or self.jpeg is not None


# The Done-means set of issue 16: skew within +-3 degrees, 150-300 dpi, with noise.
DEGRADATIONS: tuple[Degradation, ...] = (
    Degradation("clean_300", 300),
    Degradation("clean_200", 200),
    Degradation("clean_150", 150),
    Degradation("rot+0.5", 200, rotate=0.5),
    Degradation("rot-1", 200, rotate=-1.0),
    Degradation("rot+2", 200, rotate=2.0),
    Degradation("rot-3", 200, rotate=-3.0),
    Degradation("rot+5", 200, rotate=5.0),
    Degradation("rot-5", 200, rotate=-5.0),
    Degradation("noise", 200, noise=18.0),
    Degradation("blur", 200, blur=1.2),
    Degradation("jpeg50", 200, jpeg=50),
    Degradation("scan150", 150, rotate=2.0, noise=15.0, jpeg=60),
    Degradation("scan200", 200, rotate=-2.7, noise=12.0, blur=0.8, jpeg=75),
    Degradation("scan300", 300, rotate=1.3, noise=10.0, jpeg=95),
)
BY_NAME = {d.name: d for d in DEGRADATIONS}


def in_target(d: Degradation) -> bool:
    return abs(d.rotate) <= 3.0 and 150 <= d.dpi <= 300 and d.noise > 0


def apply(image: Image.Image, d: Degradation, seed_text: str) -> tuple[bytes, str]:
    """(file bytes, content type) of `image` degraded by `d`."""
    page = image.convert("L")
    if d.rotate:
        page = page.rotate(d.rotate, resample=Image.Resampling.BICUBIC, expand=False,
                           fillcolor=255)
    if d.dpi != DPI:
        scale = d.dpi / DPI
        page = page.resize((round(page.width * scale), round(page.height * scale)),
                           Image.Resampling.LANCZOS)
    if d.blur:
        page = page.filter(ImageFilter.GaussianBlur(d.blur))
    if d.noise:
        rng = np.random.default_rng(zlib.crc32(f"{seed_text}/{d.name}".encode()))
        pixels = np.asarray(page, dtype=np.float64) + rng.normal(0.0, d.noise, page.size[::-1])
        page = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    if d.jpeg is not None:
        page.save(out, format="JPEG", quality=d.jpeg, dpi=(d.dpi, d.dpi))
        return out.getvalue(), "image/jpeg"
    page.save(out, format="PNG", dpi=(d.dpi, d.dpi))
    return out.getvalue(), "image/png"
