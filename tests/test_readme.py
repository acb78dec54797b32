"""The README's quick start is code users paste: it must run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_quick_start_runs():
    if not os.path.exists(README):
        pytest.skip("not a source checkout")
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "README has no python blocks"
    scope = {}
    for block in blocks:  # later blocks use names from earlier ones, as a reader would
        exec(compile(block, README, "exec"), scope)
    assert scope["y"].shape == (8, 64, 56, 56)
