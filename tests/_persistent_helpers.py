"""Helpers shared by the persistent kernels' tests."""
import contextlib
from collections import OrderedDict

import pytest


@pytest.fixture
def use_options():
    """use_options(**changes): kernels.config.using(**changes) from the call to the end of the
    test (a later call changes the options then in force)."""
    from fused_rnn.kernels import config

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(config.using(**changes))


@pytest.fixture(autouse=True)
def _poison_and_fresh_warnings(request, monkeypatch):
    """Where kernels run, NaN-poisoned buffers (conftest's poison); fresh once-only warnings, and no
    FUSED_RNN_PATH: for every test of a module that imports it."""
    from conftest import kernel_device
    from fused_rnn import _backend, _paths

    if kernel_device() is not None:
        request.getfixturevalue("poison")
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    monkeypatch.delenv(_paths.ENV_VAR, raising=False)
