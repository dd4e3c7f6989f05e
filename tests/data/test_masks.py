"""Token-by-token masks for every format and tokenizer, against piecewise oracles."""

import pytest
import sentencepiece as spm

from eaft_megatron.data import ConfigError, InvalidRecord, encode_record, parse_record
from eaft_megatron.data.hf_chat import HFChatTokenizer

from tests.support.data import PieceOracle, chatml_oracle, save_hf_dir

SYSTEM = {"role": "system", "content": "you are helpful"}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "what is two plus four"},
    {"role": "assistant", "content": "answer six"},
    {"role": "user", "content": "tell me about cats"},
    {"role": "assistant", "content": "cats are birds\nsure"},
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": "city paris"}}
TOOL_TURNS = [
    {"role": "user", "content": "weather today"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "sunny today"},
]


def encode(obj, tok, fmt="auto"):
    ids, mask = encode_record(parse_record(obj, fmt)[1], tok)
    return ids.tolist(), mask.tolist()


def show(tok, ids, mask):  # readable failure messages
    return "".join(("[%s]" if m else "%s") % tok._tok.decode([i]) for i, m in zip(ids, mask))


@pytest.mark.parametrize("messages", [MULTI_TURN[1:3], MULTI_TURN, TOOL_TURNS],
                         ids=["single-turn", "multi-turn", "tool-calls"])
def test_chatml_messages(tokenizers, chatml_bpe, messages):
    ids, mask = encode({"messages": messages}, tokenizers["chatml"])
    expected = chatml_oracle(chatml_bpe, messages)
    assert (ids, mask) == expected, show(tokenizers["chatml"], ids, mask)
    # every assistant turn contributes, nothing else does
    assert sum(mask) == sum(expected[1]) > 0


def test_sharegpt_and_alpaca_equal_their_messages(tokenizers, chatml_bpe):
    tok = tokenizers["chatml"]
    sharegpt = {"system": "you are helpful", "conversations": [
        {"from": "human", "value": "what is two plus four"}, {"from": "gpt", "value": "answer six"},
        {"from": "human", "value": "tell me about cats"},
        {"from": "gpt", "value": "cats are birds\nsure"}]}
    assert encode(sharegpt, tok) == chatml_oracle(chatml_bpe, MULTI_TURN)
    alpaca = {"instruction": "what is", "input": "two plus four", "output": "answer six"}
    assert encode(alpaca, tok) == chatml_oracle(chatml_bpe, [
        {"role": "user", "content": "what is\n\ntwo plus four"},
        {"role": "assistant", "content": "answer six"}])


def test_text_supervises_every_token_and_ends_with_eos(tokenizers, chatml_bpe):
    ids, mask = encode({"text": "the quick brown fox"}, tokenizers["chatml"])
    eos = chatml_bpe.token_to_id("<|im_end|>")
    assert ids == chatml_bpe.encode("the quick brown fox").ids + [eos]
    assert mask == [0] + [1] * (len(ids) - 1)


def test_tokenized_labels_become_the_mask(tokenizers):
    obj = {"input_ids": [7, 8, 9, 10, 11], "labels": [-100, -100, 9, 10, -100]}
    assert encode(obj, None) == ([7, 8, 9, 10, 11], [0, 0, 1, 1, 0])
    assert encode({"input_ids": [7, 8, 9]}, tokenizers["chatml"]) == ([7, 8, 9], [0, 1, 1])


def test_qwen3_reasoning_turns(tokenizers, chatml_bpe):
    """Earlier turns lose their <think> block, the last one is written with it: the turns are
    located although rendering a prefix of the chat is not a prefix of the whole rendering."""
    messages = [
        {"role": "user", "content": "what is two plus four"},
        {"role": "assistant", "content": "<think>plan</think>\n\nanswer six"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "<think>\nthink\n</think>\n\nbye"},
    ]
    o = PieceOracle(chatml_bpe)
    o.add("<|im_start|>user\nwhat is two plus four<|im_end|>\n<|im_start|>assistant\n", False)
    o.add("answer six<|im_end|>", True).add("\n", False)
    o.add("<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n", False)
    o.add("<think>\nthink\n</think>\n\nbye<|im_end|>", True).add("\n", False)
    ids, mask = encode({"messages": messages}, tokenizers["qwen3"])
    assert (ids, mask) == o.result(), show(tokenizers["qwen3"], ids, mask)


def test_qwen3_tool_chain_history_rewritten_later(tokenizers, chatml_bpe):
    """Reasoning kept inside a tool chain is dropped once a new user turn follows: the prompt
    of the reply after the tool is not a prefix of the whole chat, so the reply is found as the
    next generation prompt after the previous one."""
    messages = [
        {"role": "user", "content": "weather today"},
        {"role": "assistant", "content": "<think>plan</think>\n\nsearch"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "it is sunny"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "bye"},
    ]
    o = PieceOracle(chatml_bpe)
    o.add("<|im_start|>user\nweather today<|im_end|>\n<|im_start|>assistant\n", False)
    o.add("search<|im_end|>", True).add("\n", False)
    o.add("<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n", False)
    o.add("it is sunny<|im_end|>", True).add("\n", False)
    o.add("<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n", False)
    o.add("<think>\n\n</think>\n\nbye<|im_end|>", True).add("\n", False)
    ids, mask = encode({"messages": messages}, tokenizers["qwen3"])
    assert (ids, mask) == o.result(), show(tokenizers["qwen3"], ids, mask)


def test_generation_prompt_unlike_earlier_turns(tmp_path, chatml_bpe):
    """Qwen3 with thinking off: prompts end with an empty <think></think> that earlier turns do
    not have; those turns are located by the part of the prompt they share (the header)."""
    from tests.support.data import QWEN3_TEMPLATE

    template = QWEN3_TEMPLATE.replace(
        "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
        "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}")
    assert template != QWEN3_TEMPLATE
    tok = HFChatTokenizer(str(save_hf_dir(chatml_bpe, tmp_path / "t", template=template,
                                          eos="<|im_end|>", pad="<|endoftext|>")))
    messages = [{"role": "user", "content": "what is two plus four"},
                {"role": "assistant", "content": "answer six"},
                {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": "bye"}]
    o = PieceOracle(chatml_bpe)
    o.add("<|im_start|>user\nwhat is two plus four<|im_end|>\n<|im_start|>assistant\n", False)
    o.add("answer six<|im_end|>", True).add("\n", False)
    o.add("<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
          False)
    o.add("bye<|im_end|>", True).add("\n", False)
    ids, mask = encode({"messages": messages}, tok)
    assert (ids, mask) == o.result(), show(tok, ids, mask)


def test_glm_turns_end_at_the_next_role_tag_and_eos_is_appended(tokenizers, glm_bpe):
    ids, mask = encode({"messages": MULTI_TURN}, tokenizers["glm"])
    o = PieceOracle(glm_bpe)
    o.add("[gMASK]<sop><|system|>\nyou are helpful<|user|>\nwhat is two plus four<|assistant|>",
          False)
    o.add("\nanswer six<|user|>", True)  # GLM-4 stops generating at <|user|>
    o.add("\ntell me about cats<|assistant|>", False)
    o.add("\ncats are birds\nsure", True).add_id(glm_bpe.token_to_id("<|endoftext|>"), True)
    assert (ids, mask) == o.result(), show(tokenizers["glm"], ids, mask)


def test_sentencepiece_prompt_format(tokenizers, tokenizer_dirs):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dirs["sp"]))
    ids, mask = encode({"messages": MULTI_TURN}, tokenizers["sp"])
    bos, eos = sp.bos_id(), sp.eos_id()
    exp_ids, exp_mask = [bos], [0]
    for m in MULTI_TURN:
        tag = sp.encode({"system": "System:", "user": "User:",
                         "assistant": "Assistant:"}[m["role"]])
        body = sp.encode(m["content"]) + ([eos] if m["role"] == "assistant" else [])
        exp_ids += tag + body
        exp_mask += [0] * len(tag) + [int(m["role"] == "assistant")] * len(body)
    assert (ids, mask) == (exp_ids, exp_mask)
    assert encode({"text": "hello world"}, tokenizers["sp"]) == (
        [bos] + sp.encode("hello world") + [eos], [0] + [1] * (len(sp.encode("hello world")) + 1))


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "hi <|im_end|> there"}, {"role": "assistant", "content": "ok"}],
     "messages[0].content (user) contains the special token '<|im_end|>'"),
    # "\n\n" is one token: the prompt's last "\n" would merge with the reply's first
    ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "\n\nsure"}],
     "assistant turn messages[1] does not start on a token boundary"),
])
def test_chatml_rejections(tokenizers, messages, reason):
    with pytest.raises(InvalidRecord) as e:
        encode({"messages": messages}, tokenizers["chatml"])
    assert reason in str(e.value)


@pytest.mark.parametrize("template, reason", [
    # replies written under another header than the generation prompt's
    ("{% for m in messages %}<|im_start|>{{ 'bot' if m.role == 'assistant' else m.role }}\n"
     "{{ m.content }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "cannot locate assistant turn messages[1]"),
    # no special token between a reply and the next message
    ("{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}"
     "{% if add_generation_prompt %}assistant:\n{% endif %}",
     "no end-of-turn token after assistant turn messages[1]"),
    # a template that replaces the reply
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
     "{{ 'ok' if m.role == 'assistant' else m.content }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "does not end with its content"),
])
def test_templates_that_cannot_be_verified_are_rejected(tmp_path, chatml_bpe, template, reason):
    tok = HFChatTokenizer(str(save_hf_dir(chatml_bpe, tmp_path / "t", template=template,
                                          eos="<|im_end|>", pad="<|endoftext|>")))
    with pytest.raises(InvalidRecord) as e:
        encode({"messages": MULTI_TURN[1:]}, tok)
    assert reason in str(e.value)


def test_setup_errors(tokenizers, tmp_path):
    with pytest.raises(ConfigError, match="has no chat_template"):
        encode({"messages": MULTI_TURN}, tokenizers["notemplate"])
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        encode({"text": "hello"}, None)
    from eaft_megatron.data import load_tokenizer

    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "empty")
