"""Open Prefect UI pages in headless Chromium, signed in, and take screenshots.

    python infra/prefect/browser.py URL OUT.png [--text TEXT ...] [--timeout S]

Signs in the way the UI's login form does (the base64 of ``PREFECT_API_AUTH_STRING`` in the
page's local storage), waits until every ``--text`` is on the rendered page, and writes a
PNG. Talks to Chromium over the DevTools protocol (``--remote-debugging-port``) with the
``websockets`` package that Prefect already depends on. Needs Debian's ``chromium``
(``infra/prefect/install-deps.sh``).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def chromium_path() -> str:
    """The Chromium executable (``CHROMIUM`` overrides the search)."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    raise FileNotFoundError(
        "no chromium on PATH; install it with infra/prefect/install-deps.sh (Debian: chromium)"
    )


class Page:
    """One browser tab driven over the DevTools protocol."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._ws = connect(ws_url, max_size=None, open_timeout=30)
        self._ids = itertools.count(1)

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        """Send a command and return its result (events in between are skipped)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"chromium {method}: {reply['error']}")
                return reply.get("result", {})

    def text(self) -> str:
        """The rendered text of the page."""
        result = self.call(
            "Runtime.evaluate",
            expression="document.body ? document.body.innerText : ''",
            returnByValue=True,
        )
        return result.get("result", {}).get("value") or ""

    def click_text(self, text: str, timeout: float = 60.0) -> None:
        """Click the first tab, button or link whose text is ``text`` (waits for it)."""
        script = (
            "(() => { const e = [...document.querySelectorAll('button,a,[role=tab],li')]"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});"
            " if (e) { e.click(); return true; } return false; })()"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.call("Runtime.evaluate", expression=script, returnByValue=True)
            if result.get("result", {}).get("value"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"nothing to click with text {text!r} after {timeout:.0f} s")

    def close(self) -> None:
        """Close the connection."""
        self._ws.close()


@contextmanager
def browser(*, width: int = 1400, height: int = 1000, timeout: float = 60.0) -> Iterator[Page]:
    """A headless Chromium with one page; the browser is stopped on exit."""
    profile = tempfile.mkdtemp(prefix="lightsheet-chromium-")
    args = [
        chromium_path(),
        "--headless=new",
        "--no-sandbox",  # root in containers and CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    page = None
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium did not open its DevTools port in {timeout:.0f} s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = [t for t in json.load(r) if t.get("type") == "page"]
        page = Page(targets[0]["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        yield page
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)


def sign_in(page: Page, auth_string: str | None) -> None:
    """Store the credentials where the Prefect UI's login form puts them, for every page."""
    if not auth_string:
        return
    token = base64.b64encode(auth_string.encode()).decode()
    page.call(
        "Page.addScriptToEvaluateOnNewDocument",
        source=f"localStorage.setItem('prefect-password', {json.dumps(token)});",
    )


def snapshot(
    page: Page,
    url: str | None,
    out: str | Path,
    *,
    texts: Sequence[str] = (),
    timeout: float = 90.0,
) -> str:
    """Open ``url`` (None: stay), wait until every text in ``texts`` is on the page, save a PNG.

    Returns
    -------
    str
        The page's rendered text.

    Raises
    ------
    TimeoutError
        A text did not appear in time (the screenshot is still written, to see why).
    """
    if url is not None:
        page.call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = page.text()
        if all(t in text for t in texts):
            time.sleep(0.5)  # let images and late rows paint before the screenshot
            break
        time.sleep(0.5)
    shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    Path(out).write_bytes(base64.b64decode(shot["data"]))
    missing = [t for t in texts if t not in text]
    if missing:
        raise TimeoutError(
            f"{url}: {missing} not on the page after {timeout:.0f} s (screenshot: {out}); "
            f"page text starts: {text[:500]!r}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--text", action="append", default=[], help="wait for this text")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    with browser() as page:
        sign_in(page, os.environ.get("PREFECT_API_AUTH_STRING"))
        snapshot(page, args.url, args.out, texts=args.text, timeout=args.timeout)
    print(f"screenshot: {args.out}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
