"""Headless Chromium driven by Selenium: Debian's `chromium` and `chromium-driver` packages, both named
by path so that Selenium Manager never looks for (or downloads) a browser or a driver of its own.

Every lookup waits for its element and fails the test with what it waited for: the test fails on a
missing element, never on a pixel. `shot()` keeps a screenshot of each step.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import (ElementClickInterceptedException, ElementNotInteractableException,
                                        StaleElementReferenceException, TimeoutException)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

WINDOW = (1400, 1000)


def system_chromium() -> tuple[str, str]:
    """Paths of the chromium binary and of its chromedriver (Debian: /usr/bin/chromium, /usr/bin/chromedriver)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, ("chromium and chromedriver are not installed: `make test-ui` installs them "
                                "(apt-get install chromium chromium-driver)")
    return browser, driver


class Browser:
    def __init__(self, screenshots: Path):
        browser, driver = system_chromium()
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        # --no-sandbox: Chromium refuses to run as root (CI, containers) with its sandbox on.
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.screenshots = screenshots
        self.shots: list[Path] = []

    def find(self, xpath: str, timeout: float = 30, within: WebElement | None = None) -> WebElement:
        """The first visible element at `xpath` (relative to `within` when given), once it is there."""
        scope = within or self.driver
        try:
            # The UIs are React pages: an element found can be re-rendered before it is looked at; look again.
            return WebDriverWait(self.driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda _: next((e for e in scope.find_elements(By.XPATH, xpath) if e.is_displayed()), None))
        except TimeoutException:
            raise AssertionError(f"no element {xpath} after {timeout:.0f} s on {self.driver.current_url}") from None

    def click(self, xpath: str, timeout: float = 30, within: WebElement | None = None) -> None:
        """Click `xpath` once it is there and takes clicks (not while covered or still sliding in)."""
        element = self.find(xpath, timeout, within)
        self.scroll_to(element)

        def clicked(_) -> bool:
            element.click()
            return True

        try:
            WebDriverWait(self.driver, timeout, ignored_exceptions=[ElementClickInterceptedException,
                                                                      ElementNotInteractableException]).until(clicked)
        except TimeoutException:
            raise AssertionError(f"{xpath} not clickable after {timeout:.0f} s on {self.driver.current_url}") from None

    def dismiss(self, xpath: str, timeout: float = 5) -> None:
        """Click `xpath` if it shows up within `timeout` (a one-time tip or promotion); nothing if it does not."""
        try:
            WebDriverWait(self.driver, timeout).until(
                lambda d: next((e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()), None)).click()
        except TimeoutException:
            pass

    def type_into(self, element: WebElement, value: object) -> None:
        """Replace the content of an input or textarea with `value`, as a user does (select all, type): the
        form's bindings hear the key events a plain element.clear() would not send."""
        self.scroll_to(element)
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(str(value))

    def report(self) -> str:
        """What the page says, for a failure's message: where it is, its visible text (the end of it), and
        the console's errors (a failed request shows there)."""
        text = self.driver.find_element(By.XPATH, "//body").text[-2000:]
        errors = [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        return f"--- page {self.driver.current_url} ---\n{text}\n--- console errors ---\n" + "\n".join(errors[-20:])

    def scroll_to(self, element: WebElement, block: str = "center") -> None:
        self.driver.execute_script(f"arguments[0].scrollIntoView({{block: '{block}'}})", element)

    def shot(self, name: str) -> None:
        path = self.screenshots / f"{len(self.shots) + 1:02d}-{name}.png"  # numbered: the steps in order
        assert self.driver.save_screenshot(str(path)), f"no screenshot {path}"
        self.shots.append(path)

    def quit(self) -> None:
        self.driver.quit()

