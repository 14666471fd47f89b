"""Open a report in headless Chromium and say whether it loaded whole: every image decoded,
no console error, no uncaught exception, no dialog (an escaped `<script>` must not run),
nothing fetched from outside the page, and a screenshot to look at.

    python -m topocoll.reports.browser_check REPORT.html --screenshot shot.png
    python reports/browser_check.py REPORT.html --screenshot shot.png  # the same, faster

prints one JSON object (the `PageCheck` fields). `check_page` runs that in a child process
in its own session and kills the whole session on timeout, so a hung browser can never
hang the caller. Needs Debian's `chromium` and the `playwright` package (its driver
only: no browser download, we point it at /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
_IMAGES_JS = """() => Array.from(document.images).map(img => ({
    src: img.getAttribute('src') || '',
    ok: img.complete && img.naturalWidth > 0 && img.naturalHeight > 0}))"""


@dataclass
class PageCheck:
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    failure: str = ""

    @property
    def ok(self) -> bool:
        return not (self.broken_images or self.console_errors or self.page_errors
                    or self.dialogs or self.outside_requests or self.failure)

    def problems(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in asdict(self).items()
                         if v and k != "images") or "none"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def check_page(html_path: Path, screenshot: Path, timeout_s: float = 45.0,
               chromium: str | None = None) -> PageCheck:
    """Check the page in a child process; on timeout kill its whole process group."""
    # By file path in isolated mode: importing the topocoll package would load torch (2 s).
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), str(html_path),
           "--screenshot", str(screenshot), "--timeout", str(max(5.0, timeout_s - 10))]
    if chromium:
        cmd += ["--chromium", chromium]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child, its driver and chromium
        proc.communicate()
        return PageCheck(failure=f"browser check timed out after {timeout_s:.0f} s")
    try:
        return PageCheck(**json.loads(out.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        return PageCheck(failure=f"browser check failed (exit {proc.returncode}): "
                                 f"{(err or out).strip()[-2000:]}")


def _inspect(html_path: Path, screenshot: Path, timeout_s: float, chromium: str) -> PageCheck:
    """In this process: load the page from disk, collect everything that went wrong."""
    from playwright.sync_api import sync_playwright

    check = PageCheck()
    url = html_path.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="topocoll-chromium-") as profile, \
            sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS),
            timeout=timeout_s * 1000, viewport={"width": 1200, "height": 900},
            offline=True)
        try:
            page = context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            page.on("console", lambda m: check.console_errors.append(m.text)
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: check.page_errors.append(str(e)))

            def on_dialog(dialog) -> None:  # type: ignore[no-untyped-def]
                check.dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on("request", lambda r: check.outside_requests.append(r.url)
                    if not r.url.startswith(("data:", "file:", "about:")) else None)
            page.goto(url, wait_until="load")
            images = page.evaluate(_IMAGES_JS)
            check.images = len(images)
            check.broken_images = [i["src"][:120] for i in images if not i["ok"]]
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--screenshot", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args(argv)
    chromium = args.chromium or find_chromium()
    if chromium is None:
        check = PageCheck(failure="chromium is not installed")
    else:
        try:
            check = _inspect(args.html, args.screenshot, args.timeout, chromium)
        except Exception as exc:  # report any browser failure as data, for the caller
            check = PageCheck(failure=f"{type(exc).__name__}: {exc}".splitlines()[0])
    print(json.dumps(asdict(check)))
    return 0 if check.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
