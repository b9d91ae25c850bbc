"""What ``help()`` shows of the public API, and the error for the form of nnsight's LoRA tutorial."""

from __future__ import annotations

import inspect
import pydoc
import re

import pytest

from nnsight_toolbox import LORA, LoraSet, Optimization, export_peft, import_peft

PUBLIC = [LORA, LoraSet, Optimization, export_peft, import_peft]


QUOTED = re.compile(r"(: |-> |\[)['\"]")  # `module: 'Envoy'`, `-> "LoraSet"`, `type['LORA']`


def own_signatures(obj) -> dict[str, str]:
    """``help()``'s signature of ``obj`` and of each method the package defines on it (torch's are not ours)."""
    found = {obj.__name__: str(inspect.signature(obj))}
    for cls in inspect.getmro(obj) if inspect.isclass(obj) else ():
        for name, value in vars(cls).items():
            function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            function = function.fget if isinstance(function, property) else function
            if inspect.isfunction(function) and function.__module__.startswith("nnsight_toolbox"):
                found.setdefault(f"{obj.__name__}.{name}", str(inspect.signature(function)))
    return found


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda obj: obj.__name__)
def test_help_shows_annotations_unquoted(obj):
    quoted = {name: sig for name, sig in own_signatures(obj).items() if QUOTED.search(sig)}
    assert not quoted, f"help({obj.__name__}) shows quoted type hints: {quoted}"
    header = pydoc.render_doc(obj, renderer=pydoc.plaintext).splitlines()
    assert not [line for line in header if f"{obj.__name__}(" in line and QUOTED.search(line)]


def test_the_quote_check_sees_a_quoted_hint():
    def quoted(module: "'Envoy'") -> "LoraSet":  # what help(LORA) showed before
        pass

    quoted.__module__ = "nnsight_toolbox.example"
    assert QUOTED.search(own_signatures(quoted)["quoted"])


def test_help_shows_the_signature_a_reader_writes():
    text = pydoc.render_doc(LORA, renderer=pydoc.plaintext)
    assert "LORA(module: nnsight.intervention.envoy.Envoy, r: int, " in text
    assert "-> nnsight_toolbox.optim.adapter_set.LoraSet" in text  # LORA.on


def test_init_has_its_own_docstring():
    doc = LORA.__init__.__doc__
    assert doc and "rank" in doc and "Initialize internal Module state" not in doc
    assert "Initialize internal Module state" not in pydoc.render_doc(LORA.__init__, renderer=pydoc.plaintext)


def test_the_tutorials_form_points_to_the_new_signature(gpt2):
    mlp = gpt2.transformer.h[0].mlp
    with pytest.raises(TypeError) as raised:
        LORA(mlp, 32, 8)  # nnsight's LoRA tutorial: LORA(module, dim, r)
    message = str(raised.value)
    assert "`LORA(module, 32, 8)`" in message  # what was received
    assert "LORA(module, r, *, dropout=0.0" in message  # what is expected
    assert "`LORA(module, r=8)`" in message  # what to write instead
    assert "migration" in message


def test_the_two_positional_form_still_builds(gpt2):
    lora = LORA(gpt2.transformer.h[0].mlp, 8)
    assert lora.r == 8 and tuple(lora.WA.shape) == (32, 8)
