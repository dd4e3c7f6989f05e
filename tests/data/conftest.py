"""Session-wide tiny tokenizers (built once, in a temporary directory)."""

from __future__ import annotations

import pytest

from tests.support.data import (CHATML_SPECIAL, CHATML_TEMPLATE, GLM_SPECIAL, GLM_TEMPLATE,
                       QWEN3_TEMPLATE, save_hf_dir, train_bpe, train_sentencepiece)


@pytest.fixture(scope="session")
def chatml_bpe():
    return train_bpe(CHATML_SPECIAL)


@pytest.fixture(scope="session")
def glm_bpe():
    return train_bpe(GLM_SPECIAL)


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory, chatml_bpe, glm_bpe):
    """``{"chatml": dir, "qwen3": dir, "glm": dir, "notemplate": dir, "sp": file.model}``."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "chatml": save_hf_dir(chatml_bpe, root / "chatml", template=CHATML_TEMPLATE,
                              eos="<|im_end|>", pad="<|endoftext|>"),
        "qwen3": save_hf_dir(chatml_bpe, root / "qwen3", template=QWEN3_TEMPLATE,
                             eos="<|im_end|>", pad="<|endoftext|>"),
        "glm": save_hf_dir(glm_bpe, root / "glm", template=GLM_TEMPLATE,
                           eos="<|endoftext|>", pad="<|endoftext|>"),
        "notemplate": save_hf_dir(chatml_bpe, root / "notemplate", template=None,
                                  eos="<|im_end|>", pad="<|endoftext|>"),
        "sp": train_sentencepiece(root / "sp.model"),
    }


@pytest.fixture(scope="session")
def tokenizers(tokenizer_dirs):
    """Loaded ``ChatTokenizer`` objects, same keys as ``tokenizer_dirs``."""
    from eaft_megatron.data import load_tokenizer

    return {name: load_tokenizer(path) for name, path in tokenizer_dirs.items()}
