"""The package can travel to a remote nnsight server that does not install it.

A remote request pickles the block's objects with nnsight's serializer; a class
from a registered package travels as source and is rebuilt on the server. These
tests check the parts of that which need no server: registration, source-only
shipping (bytecode is tied to one Python version), no zero-argument ``super()``
(rebuilt methods have no ``__class__`` cell), the clear error when the package is
not registered, and an adapter rebuilt in a process where the package cannot be
imported, run twice as a server runs two requests. `tests/remote/` runs the real thing.
"""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import cloudpickle
import pytest
import torch
from nnsight.intervention import serialization
from nnsight.intervention.source import Controller

import nnsight_toolbox
from nnsight_toolbox import LORA
from nnsight_toolbox.optim.activation import AdapterController

from conftest import hf_logits, load, randomize, reference_hook

PACKAGE_DIR = Path(nnsight_toolbox.__file__).parent


def test_importing_the_package_registers_it_for_remote_execution():
    from cloudpickle.cloudpickle import _should_pickle_by_reference

    assert not _should_pickle_by_reference(LORA)
    assert not _should_pickle_by_reference(AdapterController)


def test_an_adapter_ships_as_source_only(gpt2, monkeypatch):
    """Every function of the package that travels with a `LORA` travels as source, not bytecode."""
    as_bytecode = []
    fallback = cloudpickle.cloudpickle.Pickler._dynamic_function_reduce

    def record(self, func):
        as_bytecode.append(f"{func.__module__}.{func.__qualname__}")
        return fallback(self, func)

    monkeypatch.setattr(cloudpickle.cloudpickle.Pickler, "_dynamic_function_reduce", record)
    serialization.dumps(LORA(gpt2.transformer.h[0].mlp, r=4))
    assert [name for name in as_bytecode if name.startswith("nnsight_toolbox")] == []


def test_no_zero_argument_super_in_the_package():
    found = []
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args:
                found.append(f"{path.name}:{node.lineno}")
    assert found == [], "a method rebuilt from source on a server has no __class__ cell for super()"


#: Methods that run only on the client (building, saving, merging), where a
#: function-level relative import is fine and avoids an import cycle.
CLIENT_ONLY = {"__init__", "on", "save", "load", "merge", "unmerge", "from_contrast"}


def test_no_relative_import_inside_code_that_runs_in_a_trace():
    """A server rebuilds each function from source without its package (no ``__name__``
    in its globals), so ``from .lora import ...`` inside a function raises there."""
    found = []
    for path in (PACKAGE_DIR / "optim").glob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef) and function.name not in CLIENT_ONLY:
                found += [
                    f"{path.name}:{node.lineno} in {function.name}"
                    for node in ast.walk(function)
                    if isinstance(node, ast.ImportFrom) and node.level > 0
                ]
    assert found == [], f"import these at module level instead: {found}"


def test_unregistered_package_fails_before_sending(gpt2, monkeypatch):
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    monkeypatch.setattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    with pytest.raises(RuntimeError, match=r"nnsight\.register\(nnsight_toolbox\)"):
        serialization.dumps(lora)


def test_only_the_remote_serializer_is_checked(gpt2, monkeypatch):
    """Other uses of pickling's protocol (`copy.copy` here) work whether or not the package is registered."""
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    monkeypatch.setattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    clone = copy.copy(lora)
    assert clone.WA is lora.WA and clone.module is lora.module


SERVER = """
import importlib.abc, json, sys, torch
class NoPackage(importlib.abc.MetaPathFinder):  # the server does not install the package
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "nnsight_toolbox":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoPackage())
from nnsight import LanguageModel
from nnsight.intervention import serialization
from transformers import AutoTokenizer
path, first, second, out = sys.argv[1:5]
model = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path), dispatch=True)
results = {}
for request, payload in (("first", first), ("second", second)):
    lora = serialization.loads(open(payload, "rb").read(), model._remoteable_persistent_objects())
    lora.parameters()  # an overridden method, rebuilt from source
    with model.trace("Hello world"):
        lora()
        logits = model.lm_head.output.save()
    forward = model._module.get_submodule("transformer.h.0.mlp").__dict__["forward"]
    results[request] = {"logits": logits.tolist(), "forward": type(forward).__name__,
                        "inner": type(getattr(forward, "inner", None)).__name__}
with model.trace("Hello world"):
    base = model.lm_head.output.save()
forward = model._module.get_submodule("transformer.h.0.mlp").__dict__["forward"]
results["after"] = {"logits": base.tolist(), "forward": type(forward).__name__}
results["imported"] = [name for name in sys.modules if name.startswith("nnsight_toolbox")]
json.dump(results, open(out, "w"))
"""


@pytest.mark.slow
def test_an_adapter_rebuilt_without_the_package_runs_like_a_server(gpt2, model_paths, tmp_path, monkeypatch):
    """Requests from two clients, each rebuilt as its own copy of the package, then a base request."""
    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    randomize(lora)
    first, second = tmp_path / "first.pkl", tmp_path / "second.pkl"
    first.write_bytes(serialization.dumps(lora))
    # A second client process: cloudpickle tags classes per process, and the
    # server reuses a class it has seen under the same tag, but not under a new one.
    monkeypatch.setattr(cloudpickle.cloudpickle, "_DYNAMIC_CLASS_TRACKER_BY_CLASS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(cloudpickle.cloudpickle, "_DYNAMIC_CLASS_TRACKER_BY_ID", weakref.WeakValueDictionary())
    second.write_bytes(serialization.dumps(lora))
    out = tmp_path / "out.json"
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(SERVER))
    command = [sys.executable, str(script), model_paths["gpt2"], str(first), str(second), str(out)]
    subprocess.run(command, check=True, timeout=300)
    results = json.loads(out.read_text())

    reference = load(model_paths["gpt2"])
    with reference_hook(reference, "transformer.h.0.mlp", lora.WA.detach(), lora.WB.detach()):
        adapted = hf_logits(reference, "Hello world")
    base = hf_logits(reference, "Hello world")
    assert results["imported"] == []
    for request in ("first", "second"):
        assert torch.allclose(torch.tensor(results[request]["logits"]), adapted, atol=1e-5)
        # the second request sets the first one's controller aside instead of wrapping it
        assert (results[request]["forward"], results[request]["inner"]) == ("AdapterController", "Controller")
    assert torch.allclose(torch.tensor(results["after"]["logits"]), base, atol=1e-6)
    assert results["after"]["forward"] == Controller.__name__


def test_plain_pickling_is_refused_with_how_to_save(gpt2, tmp_path):
    """`pickle` cannot write the model the adapter's Envoy leads to: say so, and how to save instead."""
    import io
    import pickle

    lora = LORA(gpt2.transformer.h[0].mlp, r=4)
    with pytest.raises(TypeError, match=r"`LORA` cannot be pickled.*`\.save\(directory\)`, then `LORA\.load\(directory, module\)`.*`state_dict\(\)`"):
        pickle.dumps(lora)
    with pytest.raises(TypeError, match=r"`LORA` cannot be pickled"):
        torch.save(lora, io.BytesIO())
    with pytest.raises(TypeError, match=r"`LORA` cannot be pickled"):
        pickle.dumps(LORA.on(gpt2, ["c_fc"], r=2))  # a set: its adapters refuse
    restored = LORA(gpt2.transformer.h[0].mlp, r=4)
    restored.load_state_dict(pickle.loads(pickle.dumps(lora.state_dict())))  # what the message suggests works
    assert torch.equal(restored.WA, lora.WA)


def test_a_merged_adapter_ships_without_its_merge(gpt2):
    """A remote request's copy is a copy: not merged, and without the CPU copy of the weight."""
    lora = LORA(gpt2.transformer.h[1].mlp.c_fc, r=4)
    plain = len(serialization.dumps(lora))
    lora.merge()
    try:
        payload = serialization.dumps(lora)
        # The weight is 32 x 128 float32, 16 kB: its copy would show. (Rebuilding the
        # payload needs a process without the package; see the server test above.)
        assert len(payload) < plain + 4096, "the merge record (a copy of the weight) was shipped"
        assert b"_merge_record" in payload and b"MergeRecord" not in payload
    finally:
        lora.unmerge()
