"""A real headless Chromium for the console's tests, driven over the DevTools protocol (websocket JSON-RPC),
and a real uvicorn server for the app it looks at. Chromium is Debian's (`apt-get install chromium`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tests.support import eventually

# Where the console's screenshots are kept after a run (CI keeps the folder as its test artifacts).
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


# Keys that are not a letter or a digit: (code, Windows virtual key code, the text they type).
_KEYS = {"Enter": ("Enter", 13, "\r"), "Tab": ("Tab", 9, "")}


class Browser:
    """A headless Chromium and one page."""

    def __init__(self, websocket: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = websocket
        self._next = 0

    async def call(self, method: str, **params: Any) -> dict:
        self._next += 1
        ident = self._next
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive_json(), 60)
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def settled_at(self, path: str) -> None:
        """Wait until the page has loaded `path` (after a navigation or a form post and its redirect)."""
        deadline = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(AssertionError):  # a page being replaced refuses evaluation for a moment
                if await self.evaluate("location.pathname + '|' + document.readyState") == f"{path}|complete":
                    return
            await asyncio.sleep(0.2)
        raise AssertionError(f"page never settled at {path}; it is at {await self.evaluate('location.href')}")

    async def open(self, url: str, path: str) -> None:
        """Navigate to `url` and wait until the page at `path` has loaded."""
        await self.call("Page.navigate", url=url)
        await self.settled_at(path)

    async def submit_key(self, key: str) -> None:
        """Fill the sign-in form with `key` and submit it."""
        await self.evaluate(
            f"document.getElementById('api_key').value = {key!r}; document.getElementById('api_key').form.submit(); true"
        )
        await asyncio.sleep(0.5)

    async def press(self, key: str, *, alt: bool = False) -> None:
        """Press and release one key (a letter, a digit or Enter) as a keyboard does, with Alt held when `alt`:
        Alt+key is how Chromium on Linux reaches an element's accesskey."""
        code, virtual, text = _KEYS.get(key) or (
            f"Digit{key}" if key.isdigit() else f"Key{key.upper()}",
            ord(key.upper()),
            key,
        )
        event = {"key": key, "code": code, "windowsVirtualKeyCode": virtual, "modifiers": 1 if alt else 0}
        # Blink matches an access key by the key's unmodified text, as a real keyboard reports it.
        await self.call("Input.dispatchKeyEvent", type="keyDown", text=text, unmodifiedText=text, **event)
        await self.call("Input.dispatchKeyEvent", type="keyUp", **event)

    async def type(self, text: str) -> None:
        """Type `text` into the element that has the focus."""
        await self.call("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> Path:
        """The whole page (beyond the window) as a PNG at `path`."""
        picture = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(picture["data"]))
        return path


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Browser]:
    """A headless Chromium with its profile in `profile`, stopped with its helpers on the way out."""
    process = subprocess.Popen(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,1600",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        await eventually(
            lambda: port_file.exists() and port_file.read_text().strip() != "",
            timeout_s=60,
            what="chromium's DevTools port",
        )
        port = int(port_file.read_text().splitlines()[0])
        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(target for target in targets if target["type"] == "page")
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as websocket,
        ):
            browser = Browser(websocket)
            await browser.call("Page.enable")
            yield browser
    finally:
        # Chromium's helpers share its session: end the group this test started, by its id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        assert process.stderr is not None
        process.stderr.close()
