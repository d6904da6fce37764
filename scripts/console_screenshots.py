"""Screenshots of every console page over a Flywheel home with real data (e.g. after `flywheel demo`).

    .venv/bin/python scripts/console_screenshots.py --home .flywheel --out test-artifacts/console-after-demo

Creates a viewer key in the home's registry, runs `flywheel up` on the home (a local Kafka is started
and stopped with it), signs in with headless Chromium as that viewer, follows every console link from
the index (list pages, then the detail pages they link to), keeps a full-page PNG of each and an
index.html beside them, and stops what it started, by pid, even when a page fails. The key is revoked
at the end. A page that refuses or fails (a "Refused" page, the sign-in page) is named and the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.processes import free_port  # noqa: E402 - after the repository is on the path
from tests.browser import chromium  # noqa: E402 - after the repository is on the path

FLYWHEEL = REPO / ".venv" / "bin" / "flywheel"
# Detail pages per list page: enough to show every kind of page without photographing a whole registry.
DETAILS_PER_LIST = 3
MAX_PAGES = 40
# The index, the list pages, their detail pages and one level below (a model's versions).
MAX_DEPTH = 3


def flywheel(home: Path, *args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLYWHEEL), *args], env=environment(home, port), capture_output=True, text=True, timeout=300, check=True
    )


def environment(home: Path, port: int | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLYWHEEL_")}
    env["FLYWHEEL_HOME"] = str(home)
    if port is not None:
        env["FLYWHEEL_HTTP_PORT"] = str(port)
    return env


def slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", path.strip("/")).strip("-")[:80] or "index"


async def crawl(base: str, key: str, out: Path) -> list[tuple[str, str, Path]]:
    """(path, title, screenshot) of each page reached from the console's index."""
    shots: list[tuple[str, str, Path]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="flywheel-chromium-") as profile:
        async with chromium(Path(profile)) as browser:
            await browser.open(f"{base}/console", "/console/login")
            await browser.submit_key(key)
            await browser.settled_at("/console")
            queue: list[tuple[str, int]] = [("/console", 0)]
            seen: set[str] = set()
            while queue and len(shots) < MAX_PAGES:
                path, depth = queue.pop(0)
                if path in seen:
                    continue
                seen.add(path)
                await browser.call("Page.navigate", url=urljoin(base, path))
                await browser.settled_at(urlparse(path).path)
                title = await browser.evaluate("document.title")
                heading = await browser.evaluate("(document.querySelector('h1') || {innerText: ''}).innerText")
                if heading == "Refused" or "Sign in" in title:
                    failures.append(f"{path}: {heading or title}")
                shot = await browser.screenshot(out / f"{len(shots) + 1:02d}-{slug(path)}.png")
                shots.append((path, title, shot))
                print(f"console-screenshots: {path} -> {shot.name} ({title})", flush=True)
                if depth >= MAX_DEPTH:
                    continue
                links = await browser.evaluate(
                    "[...document.querySelectorAll(%r)].map(a => a.getAttribute('href'))"
                    % ("header nav a[href], main a[href]" if depth == 0 else "main a[href]")
                )
                queued = seen | {queued_path for queued_path, _ in queue}
                local = [
                    link
                    for link in dict.fromkeys(links)
                    if link.startswith("/") and "/console" in link and "/logout" not in link and link not in queued
                ]
                for link in local[: DETAILS_PER_LIST if depth else len(local)]:
                    queue.append((link, depth + 1))
    if failures:
        raise SystemExit("console pages that did not render:\n  " + "\n  ".join(failures))
    return shots


def write_index(out: Path, shots: list[tuple[str, str, Path]]) -> Path:
    items = "\n".join(
        f'<h2>{html.escape(title)} <small>{html.escape(path)}</small></h2><img src="{html.escape(shot.name)}" width="1000">'
        for path, title, shot in shots
    )
    index = out / "index.html"
    index.write_text(f"<!doctype html><meta charset=utf-8><title>Flywheel console</title>\n{items}\n")
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="The Flywheel home (FLYWHEEL_HOME) to look at.")
    parser.add_argument(
        "--out", type=Path, default=REPO / "test-artifacts" / "console-after-demo", help="Where the PNGs go."
    )
    arguments = parser.parse_args()
    home, out = arguments.home.resolve(), arguments.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()

    created = flywheel(home, "registry", "keys", "create", "console-screenshots", "--role", "viewer").stdout
    key_id = re.search(r"key id (\S+)", created)[1]  # type: ignore[index]
    key = re.search(r"^(fw_\S+)$", created, flags=re.MULTILINE)[1]  # type: ignore[index]
    port = free_port()
    log = (out / "flywheel-up.log").open("w")
    process = subprocess.Popen(
        [str(FLYWHEEL), "up"], env=environment(home, port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise SystemExit(f"flywheel up exited with {process.returncode}: see {out / 'flywheel-up.log'}")
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"flywheel up was not ready in 600 s: see {out / 'flywheel-up.log'}")
            time.sleep(2)
        shots = asyncio.run(crawl(base, key, out))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()
        flywheel(home, "registry", "keys", "revoke", key_id)
    print(f"console-screenshots: {len(shots)} pages, index {write_index(out, shots)}")


if __name__ == "__main__":
    main()
