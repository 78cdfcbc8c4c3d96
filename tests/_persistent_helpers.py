"""Helpers shared by the persistent kernels' tests."""
import contextlib

import pytest


@pytest.fixture
def use_options():
    """use_options(**changes): kernels.config.using(**changes) from the call to the end of the
    test (a later call changes the options then in force)."""
    from fused_rnn.kernels import config

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(config.using(**changes))
