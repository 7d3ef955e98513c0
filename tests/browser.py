"""Drive the demo page (``python -m vlmpipe serve``) in a real headless Chromium.

Debian's ``chromium`` and its matching ``chromedriver`` (installed by ``make test`` when
missing), driven by Selenium. Also a script, to refresh the README's screenshot::

    python tests/browser.py http://127.0.0.1:7860 IMAGE docs/demo.png "How many shapes are there?" ...
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Root needs --no-sandbox; the rest keeps an offline machine's Chromium from phoning home.
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--no-first-run",
               "--disable-sync", "--disable-default-apps", "--window-size=1280,860", "--lang=en-US"]
WAIT_S = 120  # a first caption on a loaded 2-core machine


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {pkg}; `make test` does it as root)"
    return None


@contextlib.contextmanager
def chrome() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Both paths given: Selenium Manager (which would download drivers) never runs.
    os.environ.setdefault("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in CHROME_ARGS:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


class DemoPage:
    """The demo page's controls, by the ids ``vlmpipe/demo.html`` gives them."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.d = driver
        self.wait = WebDriverWait(driver, WAIT_S)
        driver.get(url)
        self.wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"
                                                    " || document.getElementById('error').textContent !== ''"))
        if self.error():
            raise AssertionError(f"the page did not start: {self.error()}")

    def _text(self, element_id: str) -> str:
        return self.d.find_element("id", element_id).text

    def error(self) -> str:
        return self._text("error")

    def models(self) -> list[str]:
        return [o.get_attribute("value") for o in self.d.find_elements("css selector", "#model option")]

    def examples(self) -> int:
        return len(self.d.find_elements("css selector", "#examples img"))

    def upload(self, path: str | os.PathLike) -> str:
        """Choose ``path`` in the file input; the caption, or the error the page shows."""
        before = self._text("captionmeta")
        self.d.execute_script("document.getElementById('error').textContent = ''")
        self.d.find_element("id", "file").send_keys(str(Path(path).resolve()))
        self.wait.until(lambda d: self._text("captionmeta") != before or self.error())
        return self.error() or self._text("caption")

    def say(self, message: str, model: str | None = None) -> str:
        """Send ``message`` (to ``model``, when given, which starts a new conversation); the reply."""
        from selenium.webdriver.support.ui import Select

        if model is not None and Select(self.d.find_element("id", "model")).first_selected_option \
                .get_attribute("value") != model:
            Select(self.d.find_element("id", "model")).select_by_value(model)
        n = len(self.replies())
        box = self.d.find_element("id", "message")
        box.clear()
        box.send_keys(message)
        self.d.find_element("id", "send").click()
        self.wait.until(lambda d: len(self.replies()) > n or self.error())
        if self.error():
            raise AssertionError(f"the page showed an error for {message!r}: {self.error()}")
        return self.replies()[-1]

    def replies(self) -> list[str]:
        return [e.text for e in self.d.find_elements("css selector", "#dialogue .turn.model")]

    def reply_seconds(self) -> float:
        """The server's time for the last reply, as the page shows it ("chat model · 0.02 s")."""
        return float(self._text("replymeta").rsplit("·", 1)[1].split()[0])

    def caption_seconds(self) -> float:
        return float(self._text("captionmeta").rsplit("·", 1)[1].split()[0])

    def screenshot(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(path))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    url, image, shot, *messages = argv
    with chrome() as driver:
        page = DemoPage(driver, url)
        print("caption:", page.upload(image))
        for m in messages:
            print(f"{m} -> {page.say(m)}")
        page.screenshot(shot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
