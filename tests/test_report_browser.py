"""report.html in a real browser: headless Chromium decodes every image, draws the tables and
plots, logs no console error; the screenshot is kept in ``test-artifacts/report.png``.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it when missing); where it is
not installed the test skips and says how to install it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# Injected into a copy of the page (the report itself has no script): records errors and,
# once everything loaded, what the page holds, into an element --dump-dom prints.
CHECK = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.target && e.target.src)), true);
const __error = console.error; console.error = (...a) => { window.__errors.push(a.join(" ")); __error(...a); };
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = {images: imgs.length, broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
               tables: document.querySelectorAll("table").length, plots: document.querySelectorAll("svg.plot").length,
               lines: document.querySelectorAll("svg.plot polyline").length, errors: window.__errors};
  const pre = document.createElement("pre"); pre.id = "sdsctl-check"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("Chromium is not installed: `apt-get install -y chromium` (Debian; .ci/run does it) "
                "to test report.html in a browser")


def _browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(cli, recipe_file, tmp_path):
    chromium = _chromium()
    a, b = recipe_file(name="sds.yaml"), recipe_file({"guidance": {"name": "sds", "guidance_scale": 20}},
                                                     name="cfg20.yaml")
    out = tmp_path / "cmp"
    assert cli("compare", a, b, "--seeds", "2", "--steps", "4", "--out", out).exit_code == 0
    page = out / "report.html"
    text = page.read_text()
    # self-contained: no script, no stylesheet link, nothing fetched over the network
    assert "<script" not in text and "<link" not in text
    assert not re.search(r'(src|href)="(https?:)?//', text)

    checked = out / "check.html"
    checked.write_text(text.replace("<head>", "<head>" + CHECK, 1))
    dom = _browse(chromium, checked, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom")
    found = re.search(r'<pre id="sdsctl-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    # 2 recipes x 2 seeds in the grid + 2 pairs side by side in the differences
    assert check["images"] == 4 + 4 and check["broken"] == [], check
    assert check["tables"] >= 4 and check["plots"] >= 3 and check["lines"] >= 2 * check["plots"] - 2, check
    assert check["errors"] == [], check

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    run = _browse(chromium, page, tmp_path / "profile2", "--window-size=1280,2000", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE(" in line]
    assert console == [], console
