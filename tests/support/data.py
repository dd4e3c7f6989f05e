"""Tiny tokenizers built on the fly, and independent oracles for their token-level masks.

Nothing is downloaded. One byte-level BPE (``tokenizers``; runs of newlines are pre-tokenized
apart, as in Qwen's) is trained on a small corpus and saved as Hugging Face tokenizer
directories with three chat templates written for these tests:

- ``chatml``: Qwen2.5-style ``<|im_start|>role\\n...<|im_end|>\\n``, tool calls in ``<tool_call>``.
- ``qwen3``: the same, plus Qwen3's reasoning rule: an assistant turn after the last user turn
  is written ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, earlier ones keep only the answer
  (so rendering a prefix of the conversation is NOT a prefix of the whole rendering).
- ``glm``: GLM-4 style ``[gMASK]<sop><|user|>\\n...<|assistant|>\\n...`` with no end-of-turn
  token: a reply ends at the next role tag, or with EOS at the end.

The oracles encode every piece of the expected rendering separately with the raw
``tokenizers.Tokenizer`` (not through transformers) and state which pieces are supervised.
Contents in the tests start with a letter, so piecewise encoding equals whole encoding.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

WORDS = ("hello world the quick brown fox jumps over a lazy dog what is two plus four answer "
         "sure here it tell me about cats dogs and birds weather today sunny rain think plan "
         "search get_weather city paris result ok thanks bye system you are helpful assistant "
         "user tool numbers one two three").split()
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3 + ["a\n\n\nb"] * 20

CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GLM_SPECIAL = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
               "<|observation|>"]
NON_SPECIAL_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + m.content -}}"
    "{%- for call in m.tool_calls or [] -%}"
    "{{- '<tool_call>\\n' + call.function.name + ' ' + call.function.arguments -}}"
    "{{- '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content -}}"
    "{{- '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set answer = m.content -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in answer -%}"
    "{%- set reasoning = answer.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set answer = answer.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}"
    "{{- answer + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

GLM_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "{%- if m.role == 'tool' -%}{{- '<|observation|>\\n' + m.content -}}"
    "{%- else -%}{{- '<|' + m.role + '|>\\n' + m.content -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def train_bpe(special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # like Qwen's: runs of newlines are pieces of their own ("\n\nbye" -> "\n\n", "bye")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\r\n]+|\s*[^\s]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(NON_SPECIAL_ADDED)
    return tok


def save_hf_dir(tok: Tokenizer, path: Path, *, template: str | None, eos: str, pad: str) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(path))
    return path


def train_sentencepiece(path: Path) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    lines = CORPUS + ["System: User: Assistant: Tool: Tools: [ ] { } \" , :"] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=120, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, hard_vocab_limit=False,
    )
    path.write_bytes(model.getvalue())
    return path


class PieceOracle:
    """Expected ids and mask from pieces encoded one by one with the raw tokenizer."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.mask: list[int] = []

    def add(self, text: str, supervised: bool) -> "PieceOracle":
        ids = self.tok.encode(text, add_special_tokens=False).ids
        self.ids += ids
        self.mask += [int(supervised)] * len(ids)
        return self

    def add_id(self, token_id: int, supervised: bool) -> "PieceOracle":
        self.ids.append(token_id)
        self.mask.append(int(supervised))
        return self

    def result(self) -> tuple[list[int], list[int]]:
        mask = list(self.mask)
        mask[0] = 0
        return self.ids, mask


def chatml_oracle(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    o = PieceOracle(tok)
    for m in messages:
        if m["role"] == "assistant":
            o.add("<|im_start|>assistant\n", False)
            body = m["content"] + "".join(
                f"<tool_call>\n{c['function']['name']} {c['function']['arguments']}\n</tool_call>"
                for c in m.get("tool_calls", []))
            o.add(body + "<|im_end|>", True).add("\n", False)
        elif m["role"] == "tool":
            o.add(f"<|im_start|>user\n<tool_response>\n{m['content']}\n</tool_response>"
                  "<|im_end|>\n", False)
        else:
            o.add(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False)
    return o.result()


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path
