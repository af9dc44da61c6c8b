import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest

from nodes import Node


@pytest.fixture
def nodes(tmp_path):
    """Factory for node processes: nodes(role, *args, mount=...) -> started Node.
    All of them are stopped and unmounted at teardown."""
    started = []

    def make(role, *args, mount=None, start=True, name=None, prefix=()):
        name = name or f"{role}{len(started)}"
        mount = mount or str(tmp_path / f"mnt-{name}")
        n = Node(role, [*args, "--mount", mount], mount, str(tmp_path / f"{name}.log"), prefix)
        started.append(n)
        if start:
            n.start()
        return n

    yield make
    for n in reversed(started):
        n.stop()
