"""One shape for every kind: the cases where copies of shared code had drifted apart, and the import graph.

Each case was a user-visible bug while the kinds had two bases, two collections
and three formats; each is checked here against what the user should get.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import randomize

from nnsight_toolbox import DoRA, InterventionSet, LORA, LoraSet, LoReFT, ModuleCopy, SoftPrompt, SteeringVector

SRC = Path(__file__).resolve().parents[1] / "src" / "nnsight_toolbox"


def changed(member, seed=0):
    with torch.no_grad():
        for p in member.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return member


def test_a_biased_lora_in_an_intervention_set_saves_and_loads(gpt2, tmp_path):
    lora = changed(LORA(gpt2.transformer.h[0].mlp.c_fc, r=2, bias=True))
    InterventionSet([lora]).save(tmp_path / "mix")
    [back] = InterventionSet.load(tmp_path / "mix", gpt2)
    assert back.bias is not None and torch.equal(back.bias, lora.bias) and torch.equal(back.WB, lora.WB)


@pytest.mark.parametrize("build", [lambda m: DoRA(m.transformer.h[0].mlp.c_fc, r=2), lambda m: ModuleCopy(m.transformer.ln_f)], ids=["DoRA", "ModuleCopy"])
def test_dora_and_a_module_copy_save_and_load_in_an_intervention_set_and_alone(gpt2, tmp_path, build):
    member = changed(build(gpt2))
    InterventionSet([member, SteeringVector(gpt2.transformer.h[1])]).save(tmp_path / "mix")
    back = InterventionSet.load(tmp_path / "mix", gpt2)[0]
    member.save(tmp_path / "one")
    alone = type(member).load(tmp_path / "one", member.module)
    for loaded in (back, alone):
        assert type(loaded) is type(member)
        for key, value in member.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_dora_load_of_a_plain_lora_says_which_class_loads_it(gpt2, tmp_path):
    LORA(gpt2.transformer.h[0].mlp.c_fc, r=2).save(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"holds a saved `LORA`, which is not a `DoRA`\. Load it with `LORA\.load"):
        DoRA.load(tmp_path / "plain", gpt2.transformer.h[0].mlp.c_fc)
    DoRA(gpt2.transformer.h[0].mlp.c_fc, r=2).save(tmp_path / "dora")
    assert type(LORA.load(tmp_path / "dora", gpt2.transformer.h[0].mlp.c_fc)) is DoRA  # a DoRA is a LORA


@pytest.mark.parametrize("collection", ["InterventionSet", "LoraSet"])
@pytest.mark.parametrize("fault", ["wrong shape", "stray key"])
def test_a_collections_load_state_dict_with_one_bad_member_changes_no_member(gpt2, collection, fault):
    loras = [LORA(gpt2.transformer.h[0].mlp.c_fc, r=2), LORA(gpt2.transformer.h[1].mlp.c_fc, r=2)]
    mix = InterventionSet(loras) if collection == "InterventionSet" else LoraSet(loras)
    before = {k: v.clone() for k, v in mix.state_dict().items()}
    state = {k: v + 1 for k, v in mix.state_dict().items()}
    last = sorted(state)[-1]  # the second member's: the first would be loaded first
    if fault == "wrong shape":
        state[last] = torch.zeros(3, 3)
    else:
        state[last.rsplit(".", 1)[0] + ".extra"] = torch.zeros(1)
    with pytest.raises((KeyError, ValueError)):
        mix.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in mix.state_dict().items())


def test_a_member_that_refuses_its_part_late_is_rolled_back(gpt2, monkeypatch):
    first, second = LORA(gpt2.transformer.h[0].mlp.c_fc, r=2), LoReFT(gpt2.transformer.h[1], r=2)
    mix = InterventionSet([first, second])
    before = {k: v.clone() for k, v in mix.state_dict().items()}
    state = {k: v + 1 for k, v in mix.state_dict().items()}
    monkeypatch.setattr(LoReFT, "load_state_dict", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("disk gone")))
    with pytest.raises(RuntimeError, match="disk gone"):
        mix.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in mix.state_dict().items())


# -- messages in the kind's own words ------------------------------------------------------------


def test_a_steering_vector_outside_a_trace_is_not_told_to_merge(gpt2):
    with pytest.raises(RuntimeError) as info:
        SteeringVector(gpt2.transformer.h[0])()
    assert "`steer()` must be called inside" in str(info.value) and "merge" not in str(info.value)
    with pytest.raises(RuntimeError, match=r"merge it into the weights instead: `lora\.merge\(\)`"):
        LORA(gpt2.transformer.h[0].mlp.c_fc, r=2)()


def test_the_alpha_check_names_the_kinds_call(gpt2):
    steer = SteeringVector(gpt2.transformer.h[0])
    with pytest.raises(ValueError) as info:
        with gpt2.trace("Hello"):
            steer(alpha=float("nan"))
    text = str(info.value)
    assert "`steer(alpha=1.0)`" in text and "low-rank" not in text and "lora" not in text
    with pytest.raises(ValueError, match=r"the scale of the low-rank term.*`lora\(alpha=1\.0\)`"):
        with gpt2.trace("Hello"):
            LORA(gpt2.transformer.h[0].mlp.c_fc, r=2)(alpha=float("inf"))


def test_width_inference_asks_a_steering_vector_only_for_what_it_takes():
    from nnsight import NNsight

    net = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
    with pytest.raises(ValueError) as info:
        SteeringVector(net[1])
    text = str(info.value)
    assert "`output_dim=` yourself, `SteeringVector(module, ..., output_dim=...)`" in text and "input_dim" not in text
    assert SteeringVector(net[1], output_dim=8).output_dim == 8


def test_a_container_is_refused_by_every_kind_with_the_module_to_pick(gpt2):
    for build in (lambda m: SteeringVector(m), lambda m: LORA(m, r=2), lambda m: LoReFT(m, r=2), lambda m: SoftPrompt(m, n=2)):
        with pytest.raises(TypeError, match=r"`model\.transformer\.h` is a ModuleList, which the model's forward never calls.*`model\.transformer\.h\[0\]`"):
            build(gpt2.transformer.h)


def test_a_failed_save_names_the_kinds_save(gpt2, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match=r"`SteeringVector\.save`"):
        SteeringVector(gpt2.transformer.h[0]).save(tmp_path / "file")


def test_a_load_of_an_unknown_kind_says_to_define_it_first(gpt2, tmp_path):
    import json

    SteeringVector(gpt2.transformer.h[0]).save(tmp_path / "steer")
    sidecar = tmp_path / "steer" / "interventions.json"
    data = json.loads(sidecar.read_text())
    data["interventions"][0]["kind"] = "NotDefinedAnywhere"
    sidecar.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"'NotDefinedAnywhere' is not defined here.*run its class definition"):
        InterventionSet.load(tmp_path / "steer", gpt2)


# -- dependencies point one way -----------------------------------------------------------------


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in it (functions too), except type-checking blocks.

    An import of a package's name (``from ..optim import LORA``) is an edge to the
    package's ``__init__``; an import of a submodule is an edge to the submodule only.
    """
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, parts[-1] == "__init__")
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_the_modules_of_src():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert "nnsight_toolbox.artifacts.native" in graph["nnsight_toolbox.optim.module_intervention"]  # inside `save`
    assert "nnsight_toolbox.optim.kinds" in graph["nnsight_toolbox.artifacts.native"]


def test_kinds_reach_a_file_format_only_through_save_and_load():
    """`optim/` imports `artifacts.native` only inside `save`/`load` functions: the kinds do not know a format."""
    for path in (SRC / "optim").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) or isinstance(node, ast.Module):
                body_imports = [n for n in (node.body if isinstance(node, ast.Module) else ast.walk(node)) if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("native")]
                if body_imports:
                    assert isinstance(node, ast.FunctionDef) and node.name in {"save", "load"}, f"{path.name}: {getattr(node, 'name', 'module level')}"
