"""Shared fixtures: every test that takes `isa` runs once per ISA variant this CPU supports."""

import numpy as np
import pytest

import qkv_native as qn


@pytest.fixture(params=qn.supported_isas())
def isa(request):
    with qn.use_isa(request.param):
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def restore_threads():
    """Lets a test call qn.set_num_threads; the previous count is restored afterwards."""
    previous = qn.get_num_threads()
    yield
    qn.set_num_threads(previous)
