"""Fixtures for tests against a real NDIF stack (`pytest -m remote`).

The session starts one NDIF 0.1.2 stack on 127.0.0.1 serving a tiny offline
Llama, and stops it at the end, failed tests or not. The tests send requests the
way a user does (`remote=True`) and compare each result with the same
computation run locally.

Without the NDIF environment (`.venv-remote`, built by `bash ci/remote-env.sh`)
these tests are skipped with the reason shown.
"""

from __future__ import annotations

import importlib.util
import signal
import time

import pytest
from conftest import load

SKIP_REASON = (
    "needs the NDIF test environment: build it with `bash ci/remote-env.sh`, then run "
    "`PYTHONPATH=src .venv-remote/bin/python -m pytest -m remote`"
)
#: The module every adapter in these tests sits on.
TARGET = "model.layers.0.mlp"
#: Seconds any one remote test may take; a hung request then fails the test instead of CI.
TEST_TIME_LIMIT = 240

#: What the session's stack did, for the terminal summary.
_report: list[str] = []


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("ndif") is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("remote") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    for line in _report:
        terminalreporter.write_line(f"NDIF stack: {line}")


@pytest.fixture(scope="session")
def ndif(model_paths):
    """A running NDIF stack serving the tiny Llama of `model_paths`; stopped after the session."""
    from .ndif_stack import NdifStack, StackError

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # A SIGTERM (a CI time limit, say) unwinds like Ctrl-C, so the stack still stops.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        started = time.monotonic()
        try:
            stack = NdifStack.start(model_paths["llama"])
        except StackError as error:  # e.g. a port taken between choosing it and binding it: one more try
            _report.append(f"first bring-up failed, retried: {str(error).splitlines()[0]}")
            stack = NdifStack.start(model_paths["llama"])
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stack.timings.items())
        _report.append(f"up in {time.monotonic() - started:.1f} s (ready at: {stages})")
        try:
            yield stack
        finally:
            started = time.monotonic()
            killed = stack.stop()
            _report.append(f"stopped in {time.monotonic() - started:.1f} s; killed after SIGTERM: {killed or 'none'}")
            leftovers = stack.leftovers()
            assert not leftovers, f"processes left running after the NDIF stack stopped: {leftovers}"
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def client(ndif):
    """Point nnsight's client at the stack, as a user's `CONFIG.API.HOST` would."""
    import nnsight.ndif
    from nnsight import CONFIG
    from nnsight.modeling import huggingface

    path = ndif.model_path
    saved = (CONFIG.API.HOST, CONFIG.APP.REMOTE_LOGGING, nnsight.ndif._PULLED_ENV, dict(huggingface._ID_CACHE))
    CONFIG.API.HOST = ndif.api_url
    CONFIG.APP.REMOTE_LOGGING = False
    # A folder, not a Hub id: keep `to_model_key()` from asking the Hub to canonicalize it.
    huggingface._ID_CACHE[path] = path
    # nnsight ships every module importable from outside site-packages (here: `src/`)
    # by value; turn that off so only the package's own registration ships it, as
    # for a user who installed it with pip.
    nnsight.ndif._PULLED_ENV = True
    try:
        yield ndif
    finally:
        CONFIG.API.HOST, CONFIG.APP.REMOTE_LOGGING, nnsight.ndif._PULLED_ENV, cache = saved
        huggingface._ID_CACHE.clear()
        huggingface._ID_CACHE.update(cache)


@pytest.fixture
def remote_model(client):
    """The client's handle on the served model: meta weights only, traced with `remote=True`."""
    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    path = client.model_path
    model = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path))
    assert model.to_model_key() == client.model_key
    return model


@pytest.fixture
def local_model(ndif):
    """The same checkpoint loaded here, for the local side of each comparison."""
    return load(ndif.model_path)


@pytest.fixture(autouse=True)
def time_limit(request):
    """Fail a remote test that runs past `TEST_TIME_LIMIT` (a blocking request has no timeout of its own)."""
    if request.node.get_closest_marker("remote") is None:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"remote test exceeded {TEST_TIME_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
