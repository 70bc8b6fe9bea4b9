"""The browser every page test drives: Debian's Chromium through Playwright, no download.

``tools/dev.sh test`` (and so CI) installs the OS package; ``BIOLIT_CHROMIUM``
overrides the path. Registered for every test module in conftest.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


def chromium_path() -> str:
    found = os.environ.get("BIOLIT_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is not installed: apt-get install -y chromium "
                    "(or set BIOLIT_CHROMIUM to its executable)")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(),
                                              args=CHROMIUM_ARGS)
        yield launched
        launched.close()
