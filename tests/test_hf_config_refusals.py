"""config.json files that cannot describe a model are refused with one line naming the key; OPT-style families."""

from __future__ import annotations

from typing import Any

import pytest

from service.planning.hf_config import model_from_hf_config
from service.planning.specs import PlanningError

LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "vocab_size": 1000,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 3}, "num_attention_heads=8 not a multiple of num_key_value_heads=3"),
        ({"hidden_size": 250}, "hidden_size=250 is not divisible by num_attention_heads=8 and head_dim is not given"),
        ({"num_hidden_layers": 0}, "config.json key 'num_hidden_layers' must be positive, got 0"),
        ({"num_hidden_layers": None}, "config.json is missing required key 'num_hidden_layers'"),
        ({"hidden_size": "256"}, "config.json key 'hidden_size' must be an integer, got '256'"),
        ({"hidden_size": True}, "config.json key 'hidden_size' must be an integer, got True"),
        ({"hidden_size": 256.5}, "config.json key 'hidden_size' must be an integer, got 256.5"),
        ({"vocab_size": -1}, "config.json key 'vocab_size' must not be negative, got -1"),
        ({"tie_word_embeddings": "yes"}, "config.json key 'tie_word_embeddings' must be true or false, got 'yes'"),
        ({"intermediate_size": None}, "config.json is missing required key 'intermediate_size'"),
        (
            {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": None},
            "config.json is missing required key 'moe_intermediate_size'",
        ),
    ],
)
def test_a_config_that_cannot_describe_the_model_is_refused(change: dict[str, Any], message: str) -> None:
    config = {**LLAMA, **change}
    with pytest.raises(PlanningError) as refused:
        model_from_hf_config(config, name="m")
    assert str(refused.value) == message


def test_whole_floats_are_integers_and_the_head_dim_is_derived() -> None:
    # Some JSON writers emit 256.0 for integer fields; head_dim = 256 / 8 when it is not given.
    model = model_from_hf_config({**LLAMA, "hidden_size": 256.0}, name="m")
    assert (model.hidden_size, model.head_dim, model.num_kv_heads) == (256, 32, 2)


@pytest.mark.parametrize(
    "config",
    [
        # An OPT model by its model_type, and an unknown architecture carrying OPT's ffn_dim key.
        {"model_type": "opt", "architectures": ["Unknown"], "ffn_dim": 1024},
        {"architectures": ["SomethingNew"], "ffn_dim": 1024},
    ],
)
def test_opt_style_configs_have_ungated_ffns_and_tied_embeddings(config: dict[str, Any]) -> None:
    base = {k: v for k, v in LLAMA.items() if k not in ("architectures", "intermediate_size")}
    model = model_from_hf_config({**base, **config}, name="opt")
    assert model.intermediate_size == 1024
    assert model.ffn_gated is False
    assert model.tie_word_embeddings is True


def test_a_moe_model_without_a_dense_ffn_uses_the_expert_width() -> None:
    config = {
        **LLAMA,
        "intermediate_size": None,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
    }
    model = model_from_hf_config(config, name="moe")
    assert model.intermediate_size == 64
    assert model.moe is not None
    assert (model.moe.num_experts, model.moe.experts_per_token, model.moe.num_shared_experts) == (8, 2, 0)


@pytest.mark.parametrize(
    ("path", "hub_id"),
    [
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("./models/llama", ""),
        ("/data/models/llama", ""),
        ("~/llama/x", ""),
        ("llama", ""),
        (None, ""),
    ],
)
def test_only_an_org_and_name_is_a_hub_id(path: str | None, hub_id: str) -> None:
    assert model_from_hf_config({**LLAMA, "_name_or_path": path}, name="m").hf_id == hub_id
