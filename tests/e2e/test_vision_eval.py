"""A few pages of the vision evaluation (eval/vision/, `make eval-vision`) in CI: scan-like
copies (tilted 1.3-2.7 degrees, noisy, JPEG, 150-300 dpi) and a PDF with a text layer, through
POST /v1/vision/extract of a real `streamgate serve`, held to issue 16's "Done means": table
cells exact >= 98 % and CER <= 2 % on every page, every OCR word in the answer, text-layer pages
exact; each page's OCR languages picked by its script (no `languages` in the request): English
pages read with English alone, the Hindi page with Hindi. (Seconds per page are measured by the
full evaluation, not asserted here.)"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from eval.vision.run import Result, Server, cases, run_case, serve
from tests.system_tools import require_programs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    require_programs("tesseract", "pdftoppm", "pdftotext")
    with serve(one_core=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def results(server: Server) -> list[Result]:
    chosen = [c for c in cases(["invoice", "table_unruled", "two_column", "hindi"],
                               ["scan150", "scan200", "scan300"])
              if (c.name, c.degradation) in {("invoice", "scan150"),
                                             ("table_unruled", "scan200"),
                                             ("two_column", "scan300"),
                                             ("hindi", "scan150")}
              or c.name == "pdf_text_layer"]
    assert len(chosen) == 5
    return [run_case(server.url, case) for case in chosen]


def test_scans_meet_the_targets(results: list[Result]) -> None:
    for r in results:
        assert not r.error, (r.case.name, r.error)
        for score in r.scores:
            where = f"{r.case.name}/{r.case.degradation}"
            assert score.cer <= 0.02, (where, score)
            if score.cells_total:
                assert score.cells_right / score.cells_total >= 0.98, (where, score)
            assert score.ocr_words > 0 and score.covered_words == score.ocr_words, where


def test_skew_is_reported_and_the_text_layer_is_exact(results: list[Result]) -> None:
    skews = {r.case.degradation: r.skew[0] for r in results
             if r.case.degradation != "pdf" and r.case.name != "hindi"}
    assert skews["scan150"] == pytest.approx(2.0, abs=0.1)
    assert skews["scan200"] == pytest.approx(-2.7, abs=0.1)
    assert skews["scan300"] == pytest.approx(1.3, abs=0.1)
    [pdf] = [r for r in results if r.case.name == "pdf_text_layer"]
    assert len(pdf.scores) == 2
    assert all(s.cer == 0.0 and s.word_recall == 1.0 for s in pdf.scores)
    assert pdf.scores[1].cells_right == pdf.scores[1].cells_total == 15


def test_each_page_is_read_in_the_languages_of_its_script(results: list[Result]) -> None:
    devanagari = re.compile("[\u0900-\u097f]")
    for r in results:
        if r.case.degradation == "pdf":
            continue
        [languages], [text] = r.languages, r.texts
        if r.case.name == "hindi":
            # Devanagari lines and one Latin line ("Reference: HR-2026-04"): Hindi first.
            assert languages == "hin+eng", r.case.name
            assert devanagari.search(text) and "HR-2026-04" in text
        else:
            assert languages == "eng", r.case.name
            assert not devanagari.search(text), (r.case.name, text)
