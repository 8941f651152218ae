"""
pytest settings for chatterd's trial test cases.

trial runs tests inside ``_trial_temp/``; under pytest, ``TestCase.mktemp()``
would litter the checkout instead.  So the session runs in a temporary
directory of its own, removed at the end.  (pytest puts the checkout on
``sys.path`` by absolute path, so imports are unaffected.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _run_in_a_temporary_directory() -> Iterator[None]:
    before = os.getcwd()
    path = tempfile.mkdtemp(prefix="chatterd-tests-")
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
        shutil.rmtree(path, ignore_errors=True)
