"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: the small ops of these tests run fastest that way on a
    busy 2-core machine, and bitwise-equal CPU results need a fixed thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
