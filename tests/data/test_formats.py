import pytest

from eaft_megatron.data.formats import (Conversation, InvalidRecord, TextRecord, TokenizedRecord,
                                        parse_line, parse_record)


@pytest.mark.parametrize("obj, fmt", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "sharegpt"),
    ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"text": "a b"}, "text"),
    ({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, "tokenized"),
    # detection order: input_ids before messages before text
    ({"input_ids": [1, 2], "text": "ignored"}, "tokenized"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "text": "ignored"}, "messages"),
])
def test_auto_detection(obj, fmt):
    assert parse_record(obj, "auto")[0] == fmt


def test_sharegpt_and_alpaca_normalise_to_messages():
    _, conv = parse_record({"system": "S", "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": "f"},
        {"from": "observation", "value": "o"}, {"from": "gpt", "value": "a"}]})
    assert isinstance(conv, Conversation)
    assert [(m["role"], m["content"]) for m in conv.messages] == [
        ("system", "S"), ("user", "q"), ("assistant", "f"), ("tool", "o"), ("assistant", "a")]
    _, conv = parse_record({"instruction": "Add", "input": "2+2", "output": "4", "system": "S"})
    assert conv.messages == [{"role": "system", "content": "S"},
                             {"role": "user", "content": "Add\n\n2+2"},
                             {"role": "assistant", "content": "4"}]
    _, conv = parse_record({"instruction": "", "input": "only input", "output": "x"})
    assert conv.messages[0] == {"role": "user", "content": "only input"}


def test_messages_keep_tool_fields_and_allow_null_content_with_tool_calls():
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    _, conv = parse_record({"tools": [{"name": "f"}], "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "r", "tool_call_id": "1"},
        {"role": "assistant", "content": "a", "ignored_key": 1}]})
    assert conv.tools == [{"name": "f"}]
    assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert conv.messages[2]["tool_call_id"] == "1"
    assert "ignored_key" not in conv.messages[3]


def test_text_and_tokenized_records():
    assert parse_line(b'{"text": "x y"}') == ("text", TextRecord("x y"))
    assert parse_line('{"input_ids": [5, 6]}') == ("tokenized", TokenizedRecord([5, 6], None))


@pytest.mark.parametrize("obj, fmt, reason", [
    ({"text": "x"}, "messages", "'messages' must be a non-empty list"),
    ({"messages": []}, "auto", "'messages' must be a non-empty list"),
    ({"input_ids": [1, True]}, "auto", "input_ids[1] must be an integer, got bool"),
    ({"input_ids": [1, 2.0]}, "auto", "input_ids[1] must be an integer, got float"),
    ({"input_ids": [1, -3]}, "auto", "input_ids[1] = -3 is not a valid token id"),
    ({"input_ids": [1, 2], "labels": [1]}, "auto", "labels has 1 entries but input_ids has 2"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}, "auto",
     "conversations[1].value must be a string, got int"),
    ({"instruction": "i", "output": ["x"]}, "auto", "'output' must be a string, got list"),
    ({"instruction": " ", "output": "x"}, "auto", "empty 'instruction' and 'input'"),
])
def test_reasons(obj, fmt, reason):
    with pytest.raises(InvalidRecord) as e:
        parse_record(obj, fmt)
    assert reason in str(e.value)


def test_unknown_format_option_is_a_programming_error():
    with pytest.raises(ValueError, match="format must be 'auto' or one of"):
        parse_record({"text": "x"}, "csv")
