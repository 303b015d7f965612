"""Check an analysis HTML report in headless Chromium: every image present and decoded.

Usage: python scripts/check_report.py REPORT.html [--screenshot OUT.png] [--chromium PATH]

1. ``--dump-dom`` of the report: every <img> must be in the rendered DOM with a data: URI
   (the report must not depend on anything outside the file).
2. A test copy of the report gets a tiny script that, on window load, counts the images whose
   ``naturalWidth > 0`` and writes the count into the DOM, which is dumped again.
3. ``--screenshot`` of the report, for a human look at the layout.

Prints ``images: N loaded: M`` and exits 0 only if N > 0 and M == N.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = "probe images: " + images.length + " loaded: " + loaded;
  document.body.appendChild(out);
});
</script>"""
IMG = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
SRC = re.compile(r"""\bsrc\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def find_chromium(explicit: str | None) -> str:
    candidates = (explicit, "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome"))
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit("chromium not found; install it with `apt-get install -y chromium` or pass --chromium PATH")


def run(chromium: str, args: list[str], profile: Path, timeout: float = 120) -> str:
    command = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        sys.exit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG path (default: REPORT.png)")
    parser.add_argument("--chromium", default=None)
    parser.add_argument("--window-size", default="1280,6000")
    args = parser.parse_args(argv)
    report = args.report.resolve()
    chromium = find_chromium(args.chromium)
    screenshot = (args.screenshot or report.with_suffix(".png")).resolve()
    source = report.read_text(encoding="utf-8")
    external = [src for tag in IMG.findall(source) for src in SRC.findall(tag) if not src.startswith("data:")]

    with tempfile.TemporaryDirectory(prefix="check-report-") as tmp:
        tmp_path = Path(tmp)
        dom = run(chromium, ["--dump-dom", report.as_uri()], tmp_path / "profile-dom")
        dom_images = IMG.findall(dom)
        probe_copy = tmp_path / "probe.html"
        probe_copy.write_text(source.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        probed = run(chromium, ["--dump-dom", probe_copy.as_uri()], tmp_path / "profile-probe")
        run(chromium, [f"--screenshot={screenshot}", f"--window-size={args.window_size}", report.as_uri()],
            tmp_path / "profile-shot")

    match = re.search(r"probe images: (\d+) loaded: (\d+)", probed)
    total, loaded = (int(match.group(1)), int(match.group(2))) if match else (len(dom_images), -1)
    print(f"images in source: {len(IMG.findall(source))} in DOM: {len(dom_images)} "
          f"non-data src: {len(external)}")
    print(f"screenshot: {screenshot} ({screenshot.stat().st_size if screenshot.exists() else 0} bytes)")
    print(f"images: {total} loaded: {loaded}")
    ok = total > 0 and loaded == total == len(dom_images) and not external and screenshot.exists()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
