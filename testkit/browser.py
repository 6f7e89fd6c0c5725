"""Headless Chromium through chromedriver (Debian ``chromium`` + ``chromium-driver``, selenium).

Selenium is blocking; the servers under test run in the test's own trio loop, so every browser
call goes through ``trio.to_thread.run_sync`` (``Browser.run``). The DevTools performance log
is on: ``requested_urls`` lists every URL the page asked for, to prove it stays on one origin.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
T = TypeVar("T")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium / chromedriver missing (Debian packages chromium, chromium-driver)",
)


class Browser:
    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots
        self._requested: list[str] = []

    async def run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn)

    async def get(self, url: str) -> None:
        await self.run(lambda: self.driver.get(url))

    async def navigate(self, action: Callable[[], object], timeout: float = 90) -> None:
        """Run ``action`` (a click that loads another page) and wait for that page."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def act() -> None:
            old = self.driver.find_element(By.TAG_NAME, "html")
            action()
            wait = WebDriverWait(self.driver, timeout)
            wait.until(lambda _: _gone(old))
            wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

        await self.run(act)

    async def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        await self.run(lambda: self.driver.save_screenshot(str(path)))
        return path

    def _drain_log(self) -> None:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self._requested.append(message["params"]["request"]["url"])

    async def requested_urls(self) -> list[str]:
        await self.run(self._drain_log)
        return list(self._requested)


@contextmanager
def chromium(shots: Path) -> Iterator[Browser]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM is not None and CHROMEDRIVER is not None
    shots.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the test may run as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # no update or safe-browsing requests of its own
        "--no-proxy-server",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        yield Browser(driver, shots)
    finally:
        driver.quit()


def _gone(element: Any) -> bool:
    """Has the page that held ``element`` been replaced? selenium's ``staleness_of`` expects
    StaleElementReferenceException, but Chromium mid-navigation may answer "Node with given id
    does not belong to the document" as a plain WebDriverException: the node is gone too."""
    from selenium.common.exceptions import WebDriverException

    try:
        element.is_enabled()
    except WebDriverException:  # StaleElementReferenceException is one
        return True
    return False
