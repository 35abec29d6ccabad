"""A headless Chromium driven over the DevTools protocol (a tiny client on websocket-client):
load a page, collect console errors and uncaught exceptions, evaluate JavaScript, take a
screenshot. Used by tests/test_report_html.py; runnable by hand:

    python tests/browser.py results/demo/report.html shot.png
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0"]


class Browser:
    """``with Browser() as b: b.load(path); b.eval("1 + 1"); b.screenshot(png)``."""

    def __init__(self, width: int = 1300, height: int = 900, executable: str = CHROMIUM, timeout: float = 60.0):
        self.width, self.height, self.timeout = width, height, timeout
        self.executable = executable
        self.events: list[dict] = []
        self._id = 0

    def __enter__(self) -> "Browser":
        import websocket  # websocket-client

        self._profile = tempfile.mkdtemp(prefix="frontier-chromium-")
        self._proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {self._proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=self.timeout,
                                               suppress_origin=True)
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._ws.close()
        finally:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, **params) -> dict:
        """Send one command; events that arrive meanwhile go to :attr:`events`."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def _wait_event(self, name: str) -> None:
        if any(ev["method"] == name for ev in self.events):
            return
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self._ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == name:
                    return
        raise TimeoutError(name)

    def load(self, path: str | Path) -> None:
        self.call("Page.navigate", url=Path(path).resolve().as_uri())
        self._wait_event("Page.loadEventFired")

    def eval(self, expression: str):
        """The JSON value of a JavaScript expression (awaits a promise); raises on an exception."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:80]}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.eval(expression)
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(expression)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for ev in self.events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('text')} {(d.get('exception') or {}).get('description', '')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                        for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log {e.get('source')}: {e.get('text')} {e.get('url', '')}")
        return out

    def screenshot(self, path: str | Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)


if __name__ == "__main__":
    with Browser() as b:
        b.load(sys.argv[1])
        time.sleep(1.0)
        print("errors:", b.errors())
        if len(sys.argv) > 2:
            print(b.screenshot(sys.argv[2]))
