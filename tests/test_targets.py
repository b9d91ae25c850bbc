"""`targets=` picks the modules PEFT's own matching rule picks; bad targets say what exists."""

import pytest
from conftest import load
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from nnsight_toolbox.optim.targets import layer_index, match_targets

# Each: (family, targets, layers). PEFT applies `layers_to_transform` to list targets only.
CASES = [
    ("gpt2", ["c_attn"], None),
    ("gpt2", ["c_proj"], None),  # both attn.c_proj and mlp.c_proj
    ("gpt2", ["attn.c_proj", "c_fc"], None),  # a path suffix and a name
    ("gpt2", ["transformer.h.1.mlp.c_fc"], None),  # a whole path
    ("gpt2", r".*\.h\.\d+\.(attn\.c_attn|mlp)", None),  # a regex for the whole path
    ("gpt2", ["c_attn", "c_fc"], [1]),
    ("llama", ["q_proj", "v_proj"], None),
    ("llama", ["v_proj", "q_proj"], 0),
    ("llama", r"model\.layers\.1\.self_attn\.[qk]_proj", None),
    ("qwen2", ["o_proj", "down_proj"], [0, 1]),
]


def peft_picks(model, targets, layers):
    """The module paths PEFT's `check_target_module_exists` accepts for the same config."""
    config = LoraConfig(target_modules=targets, layers_to_transform=layers)
    return [path for path, _ in model._module.named_modules() if path and check_target_module_exists(config, path)]


@pytest.mark.parametrize("family,targets,layers", CASES)
def test_matches_what_peft_matches(model_paths, family, targets, layers):
    model = load(model_paths[family])
    picked = match_targets(model, targets, layers)
    assert picked, "every case picks something"
    assert picked == peft_picks(model, targets, layers)


def test_a_string_must_match_the_whole_path(gpt2):
    assert match_targets(gpt2, r".*c_attn") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="matched no module"):
        match_targets(gpt2, "c_attn")  # a regex: "c_attn" is not a whole path


def test_nnsight_paths_with_the_root_name_match_too(gpt2):
    assert match_targets(gpt2, ["model.transformer.h.0.attn.c_attn"]) == ["transformer.h.0.attn.c_attn"]
    assert match_targets(gpt2, r"model\.transformer\.h\.1\.mlp") == ["transformer.h.1.mlp"]


def test_layers_applies_to_a_regex_too(gpt2):
    assert match_targets(gpt2, r".*\.c_attn", layers=1) == ["transformer.h.1.attn.c_attn"]


def test_layer_index_is_the_first_numbered_layer():
    assert layer_index("model.layers.12.mlp.experts.3.up_proj") == 12
    assert layer_index("transformer.h.0") == 0
    assert layer_index("transformer.wte") is None
    assert layer_index("encoder.layer.4.attention") == 4


def test_no_match_shows_names_and_paths_that_exist(gpt2):
    with pytest.raises(ValueError) as info:
        match_targets(gpt2, ["q_proj"])
    message = str(info.value)
    assert "'q_proj'" in message and "c_attn" in message and "transformer.h.0.attn.c_attn" in message


def test_one_list_entry_that_matches_nothing_is_an_error(gpt2):
    with pytest.raises(ValueError, match=r"\['v_porj'\]"):
        match_targets(gpt2, ["c_attn", "v_porj"])


def test_layers_that_pick_nothing_name_the_layers_there_are(gpt2):
    with pytest.raises(ValueError, match=r"Layer indices among the matches: \[0, 1\]"):
        match_targets(gpt2, ["c_attn"], layers=[7])


@pytest.mark.parametrize("targets", [None, 3, [], ["c_attn", 3], [""]])
def test_bad_targets_are_type_errors(gpt2, targets):
    with pytest.raises(TypeError, match="`targets`"):
        match_targets(gpt2, targets)


@pytest.mark.parametrize("layers", [-1, [], ["0"], True, 1.0])
def test_bad_layers_are_type_errors(gpt2, layers):
    with pytest.raises(TypeError, match="`layers`"):
        match_targets(gpt2, ["c_attn"], layers)


def test_a_regex_that_does_not_compile_says_so(gpt2):
    with pytest.raises(ValueError, match="does not compile"):
        match_targets(gpt2, "c_attn(")
