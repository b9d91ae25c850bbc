"""Every ``>>>`` example in the package's docstrings runs, and prints what it shows.

The examples follow nnsight's convention: they run inside a trace and assume
a few names, as docs/api/index.md tells the reader. Here those names are:
``torch``, ``LORA``, ``LoraSet``, ``Optimization``, ``TransformersModel``,
``AutoTokenizer``, ``model`` (the tiny offline GPT-2, hidden width 32, loaded
with ``TransformersModel``), ``lora = LORA(model.transformer.h[0].mlp, r=8)``
and ``adapters = LoraSet.on(model, ["c_attn"], r=4)``, plus the globals of the
example's own module. A deprecation warning from nnsight fails the example.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from nnsight import TransformersModel
from transformers import AutoTokenizer

from nnsight_toolbox import LORA, LoraSet, Optimization

griffe = pytest.importorskip("griffe", reason="reading docstrings as the API reference does needs the `docs` extra")

from public_api import documented_objects, load_package, public_objects  # noqa: E402

PACKAGE = load_package()
EXAMPLES = [obj for obj in documented_objects(PACKAGE) if ">>>" in obj.docstring.value]


def module_of(obj) -> str:
    while not obj.is_module:
        obj = obj.parent
    return obj.path


#: The public classes and functions (`LORA`, `export_peft`, ...), not their members.
PUBLIC_TOP = {p.obj.path for p in public_objects(PACKAGE) if p.obj.parent.is_module}


def quick_or_slow(obj):
    """The example of a public class or function is in the quick subset; the others
    (members such as ``LORA.merge``, modules, internals: most of the ~175) are marked `slow`."""
    return obj if obj.path in PUBLIC_TOP else pytest.param(obj, marks=pytest.mark.slow)


@pytest.fixture
def model(model_paths) -> TransformersModel:
    """The tiny GPT-2, loaded as the docs load it."""
    path = model_paths["gpt2"]
    return TransformersModel(path, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(path), dispatch=True)


@pytest.mark.filterwarnings("error::nnsight.NNsightDeprecationWarning")
@pytest.mark.parametrize("obj", [quick_or_slow(obj) for obj in EXAMPLES], ids=lambda obj: obj.path)
def test_docstring_example_runs(obj, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = dict(vars(importlib.import_module(module_of(obj))))
    namespace.update(
        torch=torch,
        LORA=LORA,
        Optimization=Optimization,
        TransformersModel=TransformersModel,
        AutoTokenizer=AutoTokenizer,
        model=model,
        lora=LORA(model.transformer.h[0].mlp, r=8),
        LoraSet=LoraSet,
        adapters=LoraSet.on(model, ["c_attn"], r=4),
    )
    text = obj.docstring.value.replace("/tmp/", f"{tmp_path}/")
    if "remote=True" in text:
        pytest.skip("needs an NDIF server: the same flow runs against a real one in tests/remote/ (`pytest -m remote`)")
    test = doctest.DocTestParser().get_doctest(text, namespace, obj.path, str(obj.filepath), obj.docstring.lineno - 1)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)


def test_the_examples_were_found():
    names = {obj.path for obj in EXAMPLES}
    assert "nnsight_toolbox.optim.lora.LORA" in names and "nnsight_toolbox.optim.lora.LORA.WA" in names
