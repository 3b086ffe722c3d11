"""`make eval-vision` / `python -m eval.vision.run`: the corpus, degraded, through
POST /v1/vision/extract on a real `streamgate serve`, scored into docs/vision-eval.md.

The server is started from this checkout with eval/vision/server.toml (one OCR slot, pinned to
one core with taskset where there is one), the pages are sent one at a time with no `languages`
(the server's default applies, as for a user who names none), and the wall time of each request
is its wall time per page; the CPU time of the server process and its children (tesseract,
poppler) per page is what "seconds per page on one core" is judged by, since other work on the
machine stretches wall time. The doc's "History" section is kept across runs and gets one line
per run at its top (`--label` names it, e.g. "before").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.vision import corpus
from eval.vision.degrade import BY_NAME, DEGRADATIONS, apply, in_target
from eval.vision.metrics import Score, cer, normalize, reading_order, table_cells, word_recall

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "server.toml"
DOC = ROOT / "docs" / "vision-eval.md"
HISTORY = "## History"


@dataclass(slots=True)
class Case:
    """One upload: a page (or a PDF) with the truth of each of its pages."""

    name: str  # page or document name
    degradation: str
    data: bytes
    content_type: str
    truths: list[corpus.Truth]
    target: bool = False  # in the Done-means set
    text_layer: bool = False


@dataclass(slots=True)
class Result:
    case: Case
    scores: list[Score] = field(default_factory=list)
    skew: list[float | None] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)  # the OCR languages of each page
    texts: list[str] = field(default_factory=list)  # each page's text as answered
    error: str = ""


def cases(page_names: Sequence[str] | None = None,
          degradations: Sequence[str] | None = None, pdfs: bool = True) -> list[Case]:
    chosen = [BY_NAME[n] for n in degradations] if degradations else list(DEGRADATIONS)
    out: list[Case] = []
    for page in corpus.pages(page_names):
        for d in chosen:
            data, ctype = apply(page.image, d, page.name)
            out.append(Case(page.name, d.name, data, ctype, [page.truth], target=in_target(d)))
    if pdfs:
        for doc in (corpus.text_layer_pdf(), corpus.image_only_pdf()):
            out.append(Case(doc.name, "pdf", doc.data, "application/pdf", doc.pages,
                            text_layer=doc.text_layer))
    return out


# --- the server --------------------------------------------------------------------------------

@dataclass(slots=True)
class Server:
    proc: subprocess.Popen[str]
    url: str
    stderr: list[str]


@contextmanager
def serve(one_core: bool = True) -> Iterator[Server]:
    env = {**os.environ, "STREAMGATE_SERVER__WS_PORT": "0", "STREAMGATE_SERVER__HTTP_PORT": "0"}
    args = [sys.executable, "-m", "server", "serve", "--config", str(CONFIG), "--workers", "1"]
    if one_core and shutil.which("taskset"):
        args = ["taskset", "-c", "0", *args]  # "seconds per page on one core"
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = proc.stdout.readline()
        if not first:
            proc.wait(10)
            raise RuntimeError("server did not start:\n" + "\n".join(lines[-30:]))
        info = json.loads(first)
        yield Server(proc, f"http://127.0.0.1:{info['http_port']}", lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def extract(url: str, data: bytes, content_type: str, timeout_s: float = 300.0
            ) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/v1/vision/extract", data=data, method="POST",
                                     headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


# --- scoring ----------------------------------------------------------------------------------

def _block_tokens(page: dict[str, Any]) -> Counter[str]:
    tokens: Counter[str] = Counter()
    for block in page["blocks"]:
        tokens.update(normalize(block["text"]).split())
    return tokens


def score_page(page: dict[str, Any], truth: corpus.Truth, seconds: float, cpu: float
               ) -> Score:
    text = page["text"]
    rows = [row for b in page["blocks"] if b.get("rows") for row in b["rows"]]
    right = total = 0
    for table in truth.tables:
        r, t = table_cells(rows, table)
        right, total = right + r, total + t
    tokens = _block_tokens(page)
    # The answer says how many words its OCR found (issue 16); an answer without the count
    # (before it) cannot be scored for coverage: 0 of 0, shown as "n/a".
    ocr_words = int(page.get("ocr_words", 0))
    covered = min(ocr_words, sum(tokens.values()))
    return Score(cer(text, truth.text()), word_recall(text, truth.text()),
                 reading_order(text, truth.text()), right, total, ocr_words, covered, seconds,
                 cpu)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its waited-for children (tesseract, poppler), from /proc:
    what a page costs one core, however busy the machine is with other work."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_case(url: str, case: Case, pid: int | None = None) -> Result:
    result = Result(case)
    started = time.perf_counter()
    cpu0 = cpu_seconds(pid) if pid else 0.0
    try:
        answer = extract(url, case.data, case.content_type)
    except Exception as exc:  # one page's failure is a result, not the end of the run
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    pages = max(1, len(answer["pages"]))
    seconds = (time.perf_counter() - started) / pages
    cpu = (cpu_seconds(pid) - cpu0) / pages if pid else seconds
    for page, truth in zip(answer["pages"], case.truths, strict=False):
        result.scores.append(score_page(page, truth, seconds, cpu))
        skew = page.get("skew_deg")
        result.skew.append(float(skew) if isinstance(skew, int | float) else None)
        result.languages.append(str(page.get("languages", "")))
        result.texts.append(str(page.get("text", "")))
    return result


# --- the report -------------------------------------------------------------------------------

@dataclass(slots=True)
class Summary:
    pages: int = 0
    cer: float = 0.0
    recall: float = 0.0
    order: float = 0.0
    cells_right: int = 0
    cells_total: int = 0
    ocr_words: int = 0
    covered: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    worst_cer: float = 0.0
    worst_cells: float = 1.0
    errors: int = 0

    def add(self, s: Score) -> None:
        self.pages += 1
        self.cer += s.cer
        self.recall += s.word_recall
        self.order += s.reading_order
        self.cells_right += s.cells_right
        self.cells_total += s.cells_total
        self.ocr_words += s.ocr_words
        self.covered += s.covered_words
        self.seconds += s.seconds
        self.cpu += s.cpu
        self.worst_cer = max(self.worst_cer, s.cer)
        if s.cells_total:
            self.worst_cells = min(self.worst_cells, s.cells_right / s.cells_total)

    def row(self, label: str) -> str:
        n = max(1, self.pages)
        cells = (f"{100 * self.cells_right / self.cells_total:.1f} %"
                 if self.cells_total else "-")
        coverage = f"{100 * self.covered / self.ocr_words:.1f} %" if self.ocr_words else "n/a"
        errors = f" ({self.errors} failed)" if self.errors else ""
        return (f"| {label}{errors} | {self.pages} | {100 * self.cer / n:.2f} % | "
                f"{100 * self.worst_cer:.2f} % | {100 * self.recall / n:.1f} % | {cells} | "
                f"{100 * self.order / n:.1f} % | {coverage} | {self.seconds / n:.2f} | "
                f"{self.cpu / n:.2f} |")


HEADER = ("| | pages | CER (mean) | CER (worst page) | word recall | table cells exact | "
          "reading order | coverage | s/page (wall) | CPU s/page |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def summarize(results: Sequence[Result], key: Any) -> dict[str, Summary]:
    out: dict[str, Summary] = {}
    for r in results:
        label = key(r)
        if label is None:
            continue
        summary = out.setdefault(label, Summary())
        if r.error:
            summary.errors += 1
        for s in r.scores:
            summary.add(s)
    return out


def report(results: Sequence[Result], label: str, commit: str, previous: str) -> str:
    by_degradation = summarize(results, lambda r: r.case.degradation)
    by_page = summarize(results, lambda r: r.case.name if r.case.degradation != "pdf" else None)
    target = summarize(results, lambda r: "target" if r.case.target else None).get(
        "target", Summary())
    overall = summarize(results, lambda r: "all").get("all", Summary())
    pdf_rows = summarize(results, lambda r: r.case.name if r.case.degradation == "pdf" else None)
    target_pages = [s for r in results if r.case.target for s in r.scores]
    target_tables = [s for s in target_pages if s.cells_total]
    skews = [(r.case.degradation, sk) for r in results for sk in r.skew if sk is not None]
    today = datetime.date.today().isoformat()
    lines = [
        "# Vision evaluation",
        "",
        "Generated by `make eval-vision` (eval/vision/): the corpus (an invoice with a ruled "
        "4-column table, an unruled table, a two-column article, a form, a Hindi page, drawn "
        "with Pillow and DejaVu / Lohit Devanagari at 300 dpi) degraded like scans with fixed "
        "seeds (eval/vision/degrade.py), plus a two-page PDF with a text layer and a two-page "
        "scanned PDF; each upload sent to `POST /v1/vision/extract` of a real `streamgate "
        "serve` (one OCR slot, pinned to one core) with no `languages` (the server's default "
        "applies). Metrics: eval/vision/metrics.py.",
        "",
        f"Run: {today}, commit {commit}, label `{label}`.",
        "",
        "## Done means (issue 16)",
        "",
        "Target set: every page with skew within +-3 degrees at 150-300 dpi with noise "
        "(degradations " + ", ".join(d.name for d in DEGRADATIONS if in_target(d)) + ").",
        "",
        "| target | wanted | measured | met |",
        "|---|---|---|---|",
    ]
    worst_cells = min((s.cells_right / s.cells_total for s in target_tables), default=1.0)
    worst_cer = max((s.cer for s in target_pages), default=0.0)
    cells_all = (target.cells_right / target.cells_total) if target.cells_total else 1.0
    coverage = overall.covered / overall.ocr_words if overall.ocr_words else None
    text_pdf = pdf_rows.get("pdf_text_layer", Summary())
    pdf_exact = text_pdf.pages > 0 and text_pdf.worst_cer == 0.0 and text_pdf.errors == 0
    slowest = max((s.cpu for r in results for s in r.scores), default=0.0)
    mean_s = overall.cpu / max(1, overall.pages)

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines += [
        f"| table cells exact, every target page | >= 98 % | worst page "
        f"{100 * worst_cells:.1f} % (all: {100 * cells_all:.1f} %) | {met(worst_cells >= 0.98)} |",
        f"| CER, every target page | <= 2 % | worst page {100 * worst_cer:.2f} % | "
        f"{met(worst_cer <= 0.02)} |",
        "| coverage (OCR words in the answer) | 100 % | "
        + ("not reported by the answer | **no** |" if coverage is None else
           f"{100 * coverage:.2f} % | {met(coverage >= 1.0)} |"),
        f"| text-layer PDF pages exact | CER 0 | worst page {100 * text_pdf.worst_cer:.2f} % | "
        f"{met(pdf_exact)} |",
        f"| seconds per page, one core (CPU time of the server and its tesseract runs) | "
        f"<= 1.5 | mean {mean_s:.2f}, slowest {slowest:.2f} | {met(slowest <= 1.5)} |",
        "",
        "## Per degradation",
        "",
        HEADER,
        *[by_degradation[d.name].row(d.name) for d in DEGRADATIONS if d.name in by_degradation],
        *([by_degradation["pdf"].row("pdf")] if "pdf" in by_degradation else []),
        overall.row("**all**"),
        "",
        "Degradations (rotation in degrees counter-clockwise, noise sigma in grey levels, blur "
        "radius in pixels):",
        "",
        *[f"- `{d.name}`: {d.dpi} dpi" + (f", rotated {d.rotate:+g}" if d.rotate else "")
          + (f", noise {d.noise:g}" if d.noise else "") + (f", blur {d.blur:g}" if d.blur else "")
          + (f", JPEG quality {d.jpeg}" if d.jpeg else ", PNG") for d in DEGRADATIONS],
        "",
        "## Per page type",
        "",
        HEADER,
        *[summary.row(name) for name, summary in by_page.items()],
        "",
        "## PDFs",
        "",
        HEADER,
        *[summary.row(name) for name, summary in pdf_rows.items()],
        "",
    ]
    if skews:
        errors = [abs(sk - BY_NAME[name].rotate) for name, sk in skews if name in BY_NAME]
        lines += ["## Skew estimate", "",
                  f"`skew_deg` against the rotation applied, over {len(errors)} pages: "
                  f"mean error {sum(errors) / max(1, len(errors)):.3f} degrees, worst "
                  f"{max(errors, default=0.0):.3f}.", ""]
    chosen: dict[str, Counter[str]] = {}
    for r in results:
        if r.case.degradation != "pdf":
            chosen.setdefault(r.case.name, Counter()).update(r.languages)
    if chosen:
        lines += ["## Languages", "",
                  "OCR languages each page was read with (picked by its script; the request "
                  "named none):", "",
                  *[f"- {name}: " + ", ".join(f"`{lang or '-'}` x{n}"
                                              for lang, n in counts.most_common())
                    for name, counts in chosen.items()], ""]
    failed = [r for r in results if r.error]
    if failed:
        lines += ["## Failed uploads", "",
                  *[f"- {r.case.name} / {r.case.degradation}: {r.error}" for r in failed], ""]
    entry = (f"- {today} `{label}` (commit {commit}): target set CER worst "
             f"{100 * worst_cer:.2f} %, cells exact worst {100 * worst_cells:.1f} % "
             f"(all {100 * cells_all:.1f} %); all pages: CER mean "
             f"{100 * overall.cer / max(1, overall.pages):.2f} %, word recall "
             f"{100 * overall.recall / max(1, overall.pages):.1f} %, cells exact "
             f"{100 * overall.cells_right / max(1, overall.cells_total):.1f} %, reading order "
             f"{100 * overall.order / max(1, overall.pages):.1f} %, coverage "
             + ("n/a" if coverage is None else f"{100 * coverage:.2f} %")
             + f", {mean_s:.2f} CPU s/page (slowest {slowest:.2f})")
    # Newest first; whatever an earlier doc kept under the heading (entries, a full "before"
    # table) stays below.
    lines += [HISTORY, "", entry, *([previous] if previous else []), ""]
    return "\n".join(lines)


def _previous_history(doc: Path) -> str:
    if not doc.exists():
        return ""
    text = doc.read_text()
    if HISTORY not in text:
        return ""
    return text.split(HISTORY, 1)[1].strip()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--label", default="run", help="name of this run in the history")
    parser.add_argument("--pages", nargs="*", help=f"page types ({', '.join(corpus.PAGES)})")
    parser.add_argument("--degradations", nargs="*", help="degradation names")
    parser.add_argument("--no-pdfs", action="store_true")
    parser.add_argument("--out", type=Path, default=DOC)
    parser.add_argument("--all-cores", action="store_true", help="do not pin the server")
    args = parser.parse_args(argv)
    todo = cases(args.pages, args.degradations, pdfs=not args.no_pdfs)
    print(f"{len(todo)} uploads", file=sys.stderr)
    results: list[Result] = []
    with serve(one_core=not args.all_cores) as server:
        for i, case in enumerate(todo, start=1):
            result = run_case(server.url, case, server.proc.pid)
            results.append(result)
            first = result.scores[0] if result.scores else None
            print(f"[{i}/{len(todo)}] {case.name} {case.degradation}: "
                  + (result.error or (f"cer {100 * first.cer:.1f} % cells "
                                      f"{first.cells_right}/{first.cells_total} "
                                      f"{first.seconds:.2f} s, cpu {first.cpu:.2f} s"
                                      if first else "no pages")),
                  file=sys.stderr)
    args.out.write_text(report(results, args.label, _commit(), _previous_history(args.out)))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
