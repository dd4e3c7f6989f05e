"""Architectures transformers ships next to the supported ones are refused in one line that says
what is missing (``models.registry.UNSUPPORTED``).

    python -m pytest -q tests/models/test_unsupported.py
"""

from __future__ import annotations

import types

import pytest
import transformers

from eaft_megatron.models import get_arch
from eaft_megatron.models.registry import ARCHITECTURES, UNSUPPORTED


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_known_unsupported_architecture_is_refused_with_its_reason(name):
    # The table names real transformers classes (it does not rot when transformers renames).
    assert hasattr(transformers, name), name
    assert name not in ARCHITECTURES
    config = types.SimpleNamespace(architectures=[name])
    with pytest.raises(ValueError) as err:
        get_arch(config)
    message = str(err.value)
    assert message == f"architecture {name} is not supported: {UNSUPPORTED[name]}"
    assert "\n" not in message


def test_glm5_and_qwen4_exp_say_what_is_missing():
    for name, words in (("GlmMoeDsaForCausalLM", ("DeepSeek sparse attention", "indexer")),
                        ("Qwen4ExpForCausalLM", ("hyper-connection", "n-gram"))):
        message = UNSUPPORTED[name]
        assert all(w in message for w in words), message
