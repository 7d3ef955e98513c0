"""Drive the demo page (``python -m vlmpipe serve``) in a real headless Chromium.

Debian's ``chromium`` and its matching ``chromedriver`` (installed by ``make test`` when
missing), driven by Selenium. Also a script, to refresh the README's screenshot: an image file, or
``example:MODEL:N`` (the N-th held-out example the page offers MODEL, its known questions asked when
no message is given)::

    python tests/browser.py http://127.0.0.1:7860 IMAGE docs/demo.png "How many shapes are there?" ...
    python tests/browser.py http://127.0.0.1:7860 example:qa:0 docs/demo.png
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
        """How many held-out examples the page offers (for the selected model)."""
        return len(self.d.find_elements("css selector", "#examples img"))

    def select(self, model: str) -> None:
        """Choose ``model`` in the selector (a change starts a new conversation and lists its examples)."""
        from selenium.webdriver.support.ui import Select

        box = Select(self.d.find_element("id", "model"))
        if box.first_selected_option.get_attribute("value") != model:
            box.select_by_value(model)

    def pick_example(self, index: int = 0, model: str | None = None) -> str:
        """Click the ``index``-th held-out example offered for ``model`` (the selected one when None);
        its caption (or the line that stands in for it), or the error the page shows."""
        if model is not None:
            self.select(model)
        img = self.d.find_elements("css selector", "#examples img")[index]
        key = img.get_attribute("data-id")
        self.d.execute_script("document.getElementById('error').textContent = '';"
                              "document.getElementById('preview').dataset.example = ''")
        img.click()
        self.wait.until(lambda d: self.d.find_element("id", "preview").get_attribute("data-example") == key
                        or self.error())
        return self.error() or self._text("caption")

    def suggestions(self) -> list[str]:
        """The known questions the page offers for the current image."""
        return [b.text for b in self.d.find_elements("css selector", "#suggestionlist button")]

    def ask_suggestion(self, index: int) -> str:
        """Click the ``index``-th suggested question; the reply."""
        n = len(self.replies())
        self.d.find_elements("css selector", "#suggestionlist button")[index].click()
        self.wait.until(lambda d: len(self.replies()) > n or self.error())
        if self.error():
            raise AssertionError(f"the page showed an error for suggestion {index}: {self.error()}")
        return self.replies()[-1]

    def marks(self) -> list[str | None]:
        """Per reply: "right", "wrong", or None (no known answer)."""
        out = []
        for e in self.d.find_elements("css selector", "#dialogue .turn.model"):
            cls = e.get_attribute("class").split()
            out.append("right" if "right" in cls else "wrong" if "wrong" in cls else None)
        return out

    def verdicts(self) -> list[str]:
        """The marks' texts ("✓ right · held-out answer: pink")."""
        return [e.text for e in self.d.find_elements("css selector", "#dialogue .verdict")]

    def upload(self, path: str | os.PathLike) -> str:
        """Choose ``path`` in the file input; the caption, or the error the page shows."""
        shown = lambda: self.d.execute_script("return document.body.dataset.shown || '0'")  # noqa: E731
        before = shown()
        self.d.execute_script("document.getElementById('error').textContent = ''")
        self.d.find_element("id", "file").send_keys(str(Path(path).resolve()))
        # Not the caption's line: the same image again may show the very same text.
        self.wait.until(lambda d: shown() != before or self.error())
        return self.error() or self._text("caption")

    def say(self, message: str, model: str | None = None) -> str:
        """Send ``message`` (to ``model``, when given, which starts a new conversation); the reply."""
        if model is not None:
            self.select(model)
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

    def screenshot(self, path: str | os.PathLike, width: int | None = None) -> None:
        """Save the page as a PNG; with ``width``, the window is first made that wide and as tall as
        the page, so that nothing is cut off."""
        if width is not None:  # the viewport itself (a window's height is capped by the headless screen)
            metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False}
            self.d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            metrics["height"] = self.d.execute_script("return document.documentElement.scrollHeight")
            self.d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(path))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    url, image, shot, *messages = argv
    with chrome() as driver:
        page = DemoPage(driver, url)
        if image.startswith("example:"):
            _, model, index = image.split(":")
            print("caption:", page.pick_example(int(index), model))
            asked = messages or page.suggestions()
            for m in asked:
                reply = page.say(m) if messages else page.ask_suggestion(page.suggestions().index(m))
                print(f"{m} -> {reply}")
            print("marks:", *page.verdicts(), sep="\n  ")
        else:
            print("caption:", page.upload(image))
            for m in messages:
                print(f"{m} -> {page.say(m)}")
        page.screenshot(shot, width=1320)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
