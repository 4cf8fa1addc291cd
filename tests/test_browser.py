"""Open the built smoke book in headless Chromium, as a reader would, and check what it shows.

`make test` builds `_build/smoke/html` first (and installs Debian's `chromium` when it is
missing and we are root); run alone, this module builds the smoke book when it is missing.
The pages are served over HTTP on 127.0.0.1, Chromium renders each one (MathJax included) and
dumps its DOM. Screenshots of three pages land in `_build/smoke/screenshots/`.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bookbuild import BuildPaths, read_toc

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
PATHS = BuildPaths(ROOT, "smoke")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--virtual-time-budget=5000",
    "--hide-scrollbars",
]
SCREENSHOT_PAGES = ("book/intro", "book/method", "book/results")
# Text that means TeX reached the reader unrendered (outside code, scripts and MathJax output).
RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\(?:begin|frac|mathbb|mathcal|operatorname|gamma|mu|nabla)\b")


class Page(HTMLParser):
    """Tags, ids and visible text (outside code/scripts/math) of one HTML document."""

    SKIP = {"script", "style", "pre", "code", "mjx-container", "textarea", "noscript", "svg", "math"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self._skipping: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        if tag in self.SKIP and tag not in self.VOID:
            self._skipping.append(tag)

    def handle_endtag(self, tag):
        if self._skipping and self._skipping[-1] == tag:
            self._skipping.pop()

    def handle_data(self, data):
        if not self._skipping:
            self.text.append(data)

    def attr(self, tag: str, name: str) -> list[str]:
        return [a[name] for t, a in self.tags if t == tag and a.get(name)]

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)

    @property
    def visible_text(self) -> str:
        return " ".join(self.text)


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.skip(
            "chromium is not installed: `make test` installs Debian's chromium when run as "
            "root; otherwise `apt-get install chromium`"
        )
    return path


def _run_chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def html_dir() -> Path:
    _chromium()
    if not (PATHS.html / "index.html").is_file():
        subprocess.run([sys.executable, "-m", "bookbuild", "--profile", "smoke"], cwd=ROOT, check=True)
    return PATHS.html


@pytest.fixture(scope="module")
def server(html_dir):
    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def toc_pages() -> list[str]:
    return read_toc(ROOT / "_toc.yml")


@pytest.fixture(scope="module")
def rendered(server, toc_pages) -> dict[str, Page]:
    """The DOM of every page in the toc after Chromium ran its scripts (MathJax included)."""
    return {doc: Page(_run_chromium("--dump-dom", server + doc + ".html")) for doc in toc_pages}


def test_the_index_redirects_to_the_first_page(html_dir, toc_pages):
    index = (html_dir / "index.html").read_text()
    target = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', index).group(1)
    assert target == toc_pages[0] + ".html"
    assert (html_dir / target).is_file()


def test_every_page_in_the_toc_loads(rendered, html_dir):
    for doc, page in rendered.items():
        assert (html_dir / f"{doc}.html").is_file(), doc
        assert page.count("main") == 1 and page.count("h1") >= 1, f"{doc} has no main content"
        assert "Rerun:" in page.visible_text, f"{doc} has no 'Rerun:' line"


def test_every_image_exists_and_is_not_empty(rendered, server, html_dir):
    for doc, page in rendered.items():
        for src in page.attr("img", "src"):
            if src.startswith("data:"):
                continue
            url = urllib.parse.urljoin(server + doc + ".html", src)
            assert url.startswith(server), f"{doc}: image {src} is not served by the book"
            path = html_dir / urllib.parse.unquote(urllib.parse.urlparse(url).path).lstrip("/")
            assert path.is_file() and path.stat().st_size > 0, f"{doc}: image {src} is missing or empty"


def test_the_intro_shows_the_pipeline_figure(rendered):
    assert any(src.endswith("pipeline.svg") for src in rendered["book/intro"].attr("img", "src"))


def test_mathjax_rendered_every_formula(rendered):
    method = rendered["book/method"]
    displayed = [a for t, a in method.tags if t == "mjx-container" and a.get("display") == "true"]
    assert len(displayed) >= 13, f"only {len(displayed)} displayed equations rendered on the method page"
    for doc, page in rendered.items():
        raw = RAW_TEX.findall(page.visible_text)
        assert not raw, f"{doc} shows unrendered TeX: {raw[:5]}"


def test_no_internal_link_is_broken_and_nothing_loads_from_the_network(html_dir):
    pages = {
        p: Page(p.read_text())
        for p in html_dir.rglob("*.html")
        if not {"_static", "_sources"} & set(p.relative_to(html_dir).parts)
    }
    assert len(pages) >= 5
    problems = []
    for path, page in pages.items():
        where = path.relative_to(html_dir)
        for tag, attr in (("script", "src"), ("img", "src"), ("link", "href")):
            for ref in page.attr(tag, attr):
                if re.match(r"(https?:)?//", ref):
                    if tag == "link" and not _is_resource_link(page, ref):
                        continue  # e.g. <link rel="canonical">: not fetched
                    problems.append(f"{where}: <{tag}> loads {ref} from the network")
        for href in page.attr("a", "href"):
            if re.match(r"[a-z][a-z0-9+.-]*:", href) or href.startswith("//"):
                continue  # external links are the reader's to follow
            target, _, fragment = href.partition("#")
            target_path = (path.parent / urllib.parse.unquote(target)).resolve() if target else path
            if target_path.is_dir():
                target_path = target_path / "index.html"
            if not target_path.is_file():
                problems.append(f"{where}: link to {href} has no target")
            elif fragment and target_path.suffix == ".html":
                ids = pages[target_path].ids if target_path in pages else Page(target_path.read_text()).ids
                if urllib.parse.unquote(fragment) not in ids:
                    problems.append(f"{where}: link to {href}: no element with id {fragment!r}")
    assert not problems, "\n".join(problems[:20])


def _is_resource_link(page: Page, href: str) -> bool:
    return any(
        a.get("href") == href and a.get("rel", "") in {"stylesheet", "preload", "icon", "modulepreload"}
        for t, a in page.tags
        if t == "link"
    )


def test_screenshots_of_three_pages(server, html_dir):
    PATHS.screenshots.mkdir(parents=True, exist_ok=True)
    for doc in SCREENSHOT_PAGES:
        shot = PATHS.screenshots / f"{doc.replace('/', '_')}.png"
        shot.unlink(missing_ok=True)
        _run_chromium(f"--screenshot={shot}", "--window-size=1280,2000", server + doc + ".html")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
        assert shot.stat().st_size > 20_000, f"{shot} looks blank"
