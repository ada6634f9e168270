"""The browser tier: the demo page in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium), against the real app on the demo profile.

The app runs as `make demo SERVE=1` runs it (`python -m serving.demo --serve`, here with no
samples), in a child process with a local Ray of its own: it shares nothing with the integration
tier's Ray in this pytest process, and it is stopped with Ctrl-C (SIGINT) when the module ends.
Without a browser the tier skips with an install hint; BIPROMPT_REQUIRE_BROWSER=1 (.ci/run sets
it) turns that skip into a failure.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("BIPROMPT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BIPROMPT_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = ("install it with `sudo apt-get install -y chromium chromium-driver` "
                "(Debian/Ubuntu), or point BIPROMPT_CHROMIUM / BIPROMPT_CHROMEDRIVER at a "
                "Chromium and its matching chromedriver")
APP_START_S = 240.0  # the demo app on 2 busy cores: about 20 s
APP_STOP_S = 60.0
WINDOW = (1280, 1100)
URL_LINE = re.compile(r"Try it in a browser: (http://\S+)")


def _missing_browser() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER)
               if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if not missing:
        return None
    return f"no headless Chromium here ({', '.join(missing)} missing): {INSTALL_HINT}"


@pytest.fixture(scope="module")
def chromium() -> None:
    why = _missing_browser()
    if why is None:
        pytest.importorskip("selenium", reason="selenium is in the dev extra: "
                            "pip install -e '.[dev]'")
        return
    if os.environ.get("BIPROMPT_REQUIRE_BROWSER") == "1":
        pytest.fail(why)
    pytest.skip(why)


class DemoApp:
    """`python -m serving.demo --serve --n 0` in a child process; its output kept for failures."""

    def __init__(self, out: Path):
        self.lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.demo", "--serve", "--n", "0", "--out", str(out)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"the demo app exited ({self.proc.wait()}):\n{self.log()}")
            if m := URL_LINE.search(line):
                return m.group(1)
        raise TimeoutError(f"the demo app printed no URL in {timeout_s:.0f} s:\n{self.log()}")

    def stop(self) -> int:
        """Ctrl-C, as a person stops `make demo SERVE=1`; killed if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(APP_STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return "\n".join(self.lines[-60:])


@pytest.fixture(scope="module")
def demo_app(chromium, tmp_path_factory):
    app = DemoApp(tmp_path_factory.mktemp("demo-out"))
    try:
        url = app.wait_for_url(APP_START_S)
    except BaseException:
        app.stop()
        raise
    app.page_url = url
    app.base_url = url.removesuffix("/demo/")
    yield app
    code = app.stop()
    assert code == 0, f"the demo app ended with {code} after Ctrl-C:\n{app.log()}"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(chromium, downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    # NOTE: with the driver named, Selenium Manager is skipped: nothing is downloaded
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1",
                "--disable-extensions", "--no-first-run", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    drv.execute_cdp_cmd("Browser.setDownloadBehavior",
                        {"behavior": "allow", "downloadPath": str(downloads)})
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(60)
    yield drv
    drv.quit()

