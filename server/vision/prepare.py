"""Page preparation before OCR (issue 16): contrast and noise, text size, skew, orientation.

Measured on the evaluation corpus (docs/vision-eval.md, decision 16V1): a page tilted half a
degree already scrambled the table rows, two degrees turned the table into a "figure", and grey
noise or 150 dpi text made tesseract read Latin as Devanagari. Steps, each a pure function of
the pixels (numpy + Pillow, no other image library):

1. skew: projection profiles, on the page reduced to about 1000-1300 px wide. The ink pixels
   are projected onto the vertical axis of the page turned by each candidate angle; the angle
   whose profile is sharpest (the largest sum of squared counts: text lines become narrow high
   peaks) is the skew. Coarse (0.5 degree) over +-MAX_SKEW, then 0.05 and 0.01 degree steps
   around the best: within 0.1 degree on the unit tests' pages, 0.025 on average on the corpus;
2. resolution: the same profile gives the text lines' height; the page is scaled so that the
   median line is about TARGET_LINE_PX tall (150 dpi text is enlarged, 300 dpi text reduced,
   which is also faster); turn and scale are one bilinear resampling;
3. contrast: ink (a low percentile) is stretched to black and the paper (the median of the
   light pixels) to white; when the paper is noisy (the spread of the light pixels is above
   NOISY_SIGMA grey levels) a 3x3 box blur runs first and what is left of the speckle within
   NOISE_CLIP sigmas of the paper is made white (a median filter did as well on the corpus at
   15 times the cost). Done at the smaller of the two resolutions;
4. orientation: a page whose text lines run down it is turned a quarter first (`prepare`);
   which way up (0 or 180 degrees) the text lines tell (server/vision/scripts.py), or, when
   they do not, tesseract's OSD (server/vision/ocr.py); the service applies that turn
   (`rotate_quarters`). The script of each line is told from its pixels (scripts.py).

Boxes found on the prepared page are mapped back to the uploaded page's pixels by
`PagePreparation.to_original` (the corners through the inverse transform, then their bounding
box), so the answer's boxes stay in the pixels the client sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from server.vision.ocr import Box

Gray = npt.NDArray[np.uint8]

TARGET_LINE_PX = 24.0  # median text line height (ink runs: cap to descender) tesseract reads
SCALE_SLACK = 0.15  # no resampling when the page is already within 15 % of the target
MIN_SCALE, MAX_SCALE = 0.5, 2.0
MAX_SKEW = 10.0  # degrees searched either way
MIN_TURN = 0.05  # degrees: a smaller skew is left alone
NOISY_SIGMA = 3.0  # grey levels of paper noise above which the page is denoised
NOISE_CLIP = 3.0  # ... and paper this many sigmas below its median made white
MAX_SKEW_POINTS = 200_000  # ink pixels sampled for the projection profiles
MIN_SKEW_POINTS = 500  # fewer ink pixels than this: no skew estimate (a blank page)
MIN_LINE_PX = 4  # on the reduced page: thinner runs of ink rows are rules or specks
# Upright corpus pages measured 1.1-11.7 times sharper across the rows (1.1: 18-level noise);
# a page is turned a quarter before anything else only when clearly the other way.
SIDEWAYS = 1.5


@dataclass(slots=True)
class PagePreparation:
    """What was done to a page, and the transform from prepared pixels to the original's."""

    width: int  # the original page
    height: int
    scale: float = 1.0
    skew_deg: float = 0.0  # measured tilt of the original, counter-clockwise positive
    rotation: int = 0  # quarter turns applied (counter-clockwise) after deskewing, 0-3
    denoised: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    # prepared (x, y, 1) -> original (x, y): a 2x3 affine matrix
    matrix: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def to_original(self, box: Box) -> Box:
        x0, y0, x1, y1 = box
        corners = np.array([[x0, y0, 1.0], [x1, y0, 1.0], [x0, y1, 1.0], [x1, y1, 1.0]])
        mapped = corners @ self.matrix.T
        xs, ys = mapped[:, 0], mapped[:, 1]
        nx0 = max(0, min(self.width, math.floor(float(xs.min()))))
        ny0 = max(0, min(self.height, math.floor(float(ys.min()))))
        nx1 = max(nx0, min(self.width, math.ceil(float(xs.max()))))
        ny1 = max(ny0, min(self.height, math.ceil(float(ys.max()))))
        return nx0, ny0, nx1, ny1


def _affine(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.vstack([a, [0.0, 0.0, 1.0]])


def _levels(gray: Gray) -> tuple[float, float, float]:
    """(ink, paper, noise): the darkest grey levels, the paper's median and the spread of the
    paper below it (p50 - p10 of the light pixels, over 1.28: a Gaussian's sigma; only the
    dark side is measured, the light side clips at white)."""
    sample = gray[::3, ::3]
    ink = float(np.percentile(sample, 0.5))
    top = float(np.percentile(sample, 90))
    light = sample[sample > (ink + top) / 2]
    if light.size == 0:
        return ink, top, 0.0
    paper = float(np.median(light))
    return ink, paper, (paper - float(np.percentile(light, 10))) / 1.28


def normalize_contrast(gray: Gray) -> tuple[Gray, bool]:
    """(ink stretched to black and paper to white, whether the page was denoised)."""
    ink, paper, noise = _levels(gray)
    page = gray
    denoised = noise > NOISY_SIGMA
    if denoised:
        page = np.asarray(Image.fromarray(gray).filter(ImageFilter.BoxBlur(1)),
                          dtype=np.uint8)
        ink, paper, noise = _levels(page)
    if paper - ink < 32:  # a blank or nearly uniform page: leave it alone
        return page, denoised
    # Paper within a few sigmas of its median becomes white: what the median filter left of
    # the speckle would otherwise be thresholded into specks by tesseract.
    white = max(ink + 16, paper - (NOISE_CLIP * noise if denoised else 0.0))
    lut = np.clip((np.arange(256, dtype=np.float32) - ink) * 255.0 / (white - ink), 0, 255)
    return lut.astype(np.uint8)[page], denoised


def line_height(profile: npt.NDArray[np.float64]) -> float | None:
    """Median height of the text lines in a projection profile (ink per row of the deskewed
    page): runs of rows with more than a trace of ink, at least MIN_LINE_PX tall (rules and
    specks are thinner). None without at least 3 such lines."""
    if profile.size == 0 or float(profile.max()) <= 0:
        return None
    level = max(1.0, 0.04 * float(np.percentile(profile[profile > 0], 90)))
    inked = np.concatenate(([False], profile > level, [False]))
    edges = np.flatnonzero(np.diff(inked.astype(np.int8)))
    runs = edges[1::2] - edges[::2]
    runs = runs[runs >= MIN_LINE_PX]
    if runs.size < 3:
        return None
    return float(np.median(runs))


def estimate_skew(ink: npt.NDArray[np.bool_], max_deg: float = MAX_SKEW
                  ) -> tuple[float, npt.NDArray[np.float64]] | None:
    """(the page's tilt in degrees, counter-clockwise positive; the projection profile at that
    angle), None without enough ink."""
    ys, xs = np.nonzero(ink)
    if ys.size < MIN_SKEW_POINTS:
        return None
    if ys.size > MAX_SKEW_POINTS:
        stride = ys.size // MAX_SKEW_POINTS + 1
        ys, xs = ys[::stride], xs[::stride]
    yf = ys.astype(np.float64) - ink.shape[0] / 2
    xf = xs.astype(np.float64) - ink.shape[1] / 2
    reach = int(math.hypot(*ink.shape)) + 2

    def profile(angle: float) -> npt.NDArray[np.float64]:
        t = math.radians(angle)
        # A line tilted counter-clockwise by t has y + x*tan(t) constant along it.
        proj = np.rint(yf * math.cos(t) + xf * math.sin(t)).astype(np.int64) + reach
        return np.bincount(proj, minlength=2 * reach).astype(np.float64)

    def sharpness(angle: float) -> float:
        counts = profile(angle)
        return float(np.dot(counts, counts))

    best = 0.0
    steps: tuple[tuple[float, float], ...] = ((0.5, max_deg), (0.05, 0.5), (0.01, 0.05))
    for step, span in steps:
        reach_k = round(span / step)
        angles = [best + k * step for k in range(-reach_k, reach_k + 1)]
        best = max(angles, key=sharpness)
    best = round(best, 2)
    return best, profile(best)


def prepare(gray: Gray, *, dpi: int | None = None) -> tuple[Gray, PagePreparation]:
    """The page ready for OCR, and what was done to it. A page whose text lines clearly run
    down it (SIDEWAYS times sharper across the columns) is turned a quarter first: skew, text
    size and the way up (server/vision/scripts.py) are all measured along text lines."""
    h, w = gray.shape
    t0 = time.perf_counter()
    # Skew and line height are measured on the page reduced to at most ~1300 px wide: enough
    # for 0.05 degree (a line 1000 px long rises 0.9 px per 0.05 degree), a quarter of the work.
    ink, paper, _ = _levels(gray)
    factor = max(1, w // 1000)
    image = Image.fromarray(gray)
    small = np.asarray(image.reduce(factor) if factor > 1 else image, dtype=np.uint8)
    dark = small < (ink + paper) / 2
    if side_ratio(dark) <= SIDEWAYS:
        return _prepare_upright(gray, dark, factor, paper, t0)
    page, prep = _prepare_upright(np.ascontiguousarray(np.rot90(gray)),
                                  np.ascontiguousarray(np.rot90(dark)), factor, paper, t0)
    # prepared -> turned (prep.matrix), then turned (x', y') -> original (w - y', x').
    back = np.array([[0.0, -1.0, float(w)], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    prep.matrix = (back @ _affine(prep.matrix))[:2]
    prep.width, prep.height, prep.rotation = w, h, 1
    return page, prep


def _prepare_upright(gray: Gray, dark: npt.NDArray[np.bool_], factor: int, paper: float,
                     t0: float) -> tuple[Gray, PagePreparation]:
    """`prepare` of a page whose lines run across it; `dark` is its ink on the page reduced
    by `factor`, `paper` its paper's grey level."""
    h, w = gray.shape
    prep = PagePreparation(width=w, height=h)
    found = estimate_skew(dark)
    skew, lines = 0.0, None
    if found is not None:
        # Below MIN_TURN a turn would only blur the page (0.05 degree moves the end of a
        # 1700 px line by 1.5 px), and an upright page measures within that of 0.
        skew = found[0] if abs(found[0]) >= MIN_TURN else 0.0
        lines = line_height(found[1])
    scale = 1.0
    if lines is not None:
        wanted = TARGET_LINE_PX / (lines * factor)
        if abs(wanted - 1.0) > SCALE_SLACK:
            scale = min(MAX_SCALE, max(MIN_SCALE, wanted))
    prep.scale, prep.skew_deg = scale, skew
    t1 = time.perf_counter()
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    # prepared (x', y') -> original (x, y): about the centres, turn by +skew, divide by scale.
    t = math.radians(skew)
    cos, sin = math.cos(t), math.sin(t)
    linear = np.array([[cos, sin], [-sin, cos]]) / scale
    offset = np.array([w / 2, h / 2]) - linear @ np.array([out_w / 2, out_h / 2])
    prep.matrix = np.column_stack([linear, offset])
    # Contrast and noise are dealt with at the smaller of the two resolutions (cheaper).
    page = gray
    if scale >= 1.0:
        page, prep.denoised = normalize_contrast(page)
    t2 = time.perf_counter()
    if skew or scale != 1.0:
        # One resampling for both (Pillow's transform takes the output->input matrix).
        # Bilinear: 60 ms a 200 dpi page where bicubic took 150, the same text on the corpus.
        image = Image.fromarray(page).transform(
            (out_w, out_h), Image.Transform.AFFINE, data=tuple(prep.matrix.ravel().tolist()),
            resample=Image.Resampling.BILINEAR, fillcolor=int(paper))
        page = np.asarray(image, dtype=np.uint8)
    if scale < 1.0:
        page, prep.denoised = normalize_contrast(page)
    t3 = time.perf_counter()
    prep.timings_ms = {"skew": round(1000 * (t1 - t0), 1),
                       "contrast": round(1000 * (t2 - t1), 1),
                       "transform": round(1000 * (t3 - t2), 1)}
    return page, prep


def _sharpness(profile: npt.NDArray[np.int64]) -> float:
    # Mean square over square mean: 1 for ink spread evenly, large for lines and gaps.
    return float(np.dot(profile, profile)) * profile.size


def side_ratio(ink: npt.NDArray[np.bool_]) -> float:
    """How much sharper the ink's profile is across the columns than across the rows: above 1
    when the text lines run down the page."""
    rows = _sharpness(ink.sum(axis=1, dtype=np.int64))
    return _sharpness(ink.sum(axis=0, dtype=np.int64)) / max(rows, 1.0)


def lies_on_its_side(gray: Gray) -> bool:
    """Whether the page's text lines run down it rather than across."""
    return side_ratio(gray < 128) > 1.0


def densest_band(gray: Gray, lines: int) -> Gray:
    """The band of the page, `lines` pixels across, that holds the most ink, cut along its text
    lines (rows; columns on a page lying on its side): what OSD is shown, since its cost grows
    with the page and a band of text lines names the orientation as well as the page does
    (decision 16V2). The whole page when it is no bigger."""
    sideways = lies_on_its_side(gray)
    profile = (gray < 128).sum(axis=0 if sideways else 1, dtype=np.int64)
    if profile.size <= lines:
        return gray
    window = np.convolve(profile, np.ones(lines, dtype=np.int64), mode="valid")
    start = int(np.argmax(window))
    if sideways:
        return np.ascontiguousarray(gray[:, start : start + lines])
    return np.ascontiguousarray(gray[start : start + lines])


def rotate_quarters(gray: Gray, prep: PagePreparation, quarters: int) -> Gray:
    """Turn the prepared page by `quarters` x 90 degrees counter-clockwise (what OSD says the
    page needs), updating the transform back to the original."""
    quarters %= 4
    if not quarters:
        return gray
    h, w = gray.shape
    turned = np.ascontiguousarray(np.rot90(gray, quarters))
    # turned (x', y') -> before (x, y), for one counter-clockwise quarter turn of an image of
    # width w: x = w - 1 - y', y = x'; composed `quarters` times.
    back = np.eye(3)
    cur_w, cur_h = w, h
    for _ in range(quarters):
        one = np.array([[0.0, -1.0, cur_w], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        back = back @ one
        cur_w, cur_h = cur_h, cur_w
    prep.matrix = (_affine(prep.matrix) @ back)[:2]
    prep.rotation = (prep.rotation + quarters) % 4
    return turned
