"""Headless Chromium for the viewer tests (selenium + Debian chromium / chromium-driver).

scripts/system.sh installs both (scripts/test.sh runs it), so a missing browser is a failed set-up,
not a reason to skip: the tests fail and name the fix.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Any, Iterator

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--force-device-scale-factor=1")


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """A selenium driver of a fresh headless Chromium profile, quit and removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, ("the viewer tests need Debian chromium and chromium-driver: "
                                    "run `bash scripts/system.sh` (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="kpop-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.binary_location = binary
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
