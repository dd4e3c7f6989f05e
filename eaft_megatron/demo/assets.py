"""What the demo needs and cannot download: a chat dataset, a tokenizer, a small Qwen3 model.

    python -m eaft_megatron.demo.assets          # regenerate the bundled chat.jsonl

``chat.jsonl`` (bundled, regenerated deterministically by :func:`write_chat_dataset`) holds
OpenAI-style ``messages`` conversations over a few simple skills (arithmetic, capitals, word
reversal, counting), some with a system prompt and some multi-turn. The tokenizer is a
byte-level BPE trained on it on the spot with Qwen's ChatML special tokens and chat template;
the model is a randomly initialised ``Qwen3ForCausalLM`` of a few MB sized to that tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BUNDLED_DATA = Path(__file__).with_name("chat.jsonl")

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Chile": "Santiago", "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana",
}
WORDS = ("table river stone cloud apple lemon tiger piano garden window silver orange planet "
         "candle forest bridge rocket pencil").split()
SYSTEMS = ["You are a helpful assistant.", "You answer briefly and precisely.",
           "You are a careful tutor."]


def _turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(2, 60), rng.randrange(2, 40)
        op, val = rng.choice([("plus", a + b), ("minus", a - b), ("times", a * b)])
        return f"What is {a} {op} {b}?", f"{a} {op} {b} is {val}."
    if kind == 1:
        country = rng.choice(sorted(CAPITALS))
        return (f"What is the capital of {country}?",
                f"The capital of {country} is {CAPITALS[country]}.")
    if kind == 2:
        word = rng.choice(WORDS)
        return f"Reverse the word {word}.", f"{word} reversed is {word[::-1]}."
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return (f"How many times does the letter {letter} appear in {word}?",
            f"The letter {letter} appears {n} time{'s' if n != 1 else ''} in {word}.")


def chat_dataset(n: int = 800, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _ in range(1 if rng.random() < 0.7 else rng.randrange(2, 4)):
            question, answer = _turn(rng)
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_chat_dataset(path: Path = BUNDLED_DATA, n: int = 800, seed: int = 0) -> Path:
    with open(path, "w") as f:
        for row in chat_dataset(n, seed):
            f.write(json.dumps(row) + "\n")
    return path


def train_tokenizer(data: Path, out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE with ChatML special tokens and chat template, saved as a HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(data) as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["system\nuser\nassistant\n"] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def make_qwen3_model(out_dir: Path, *, vocab_size: int, hidden: int = 128, layers: int = 4,
                     seed: int = 0) -> Path:
    """A randomly initialised Qwen3 (GQA, qk-norm, tied embeddings) saved as safetensors."""
    import torch
    import transformers

    config = qwen3_config(vocab_size=vocab_size, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return out_dir


def qwen3_config(*, vocab_size: int, hidden: int, layers: int):
    """The configuration :func:`make_qwen3_model` saves (known before anything is made)."""
    import transformers

    return transformers.Qwen3Config(
        architectures=["Qwen3ForCausalLM"], vocab_size=vocab_size, hidden_size=hidden,
        intermediate_size=hidden * 3, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=2, pad_token_id=0, dtype="float32",
    )


if __name__ == "__main__":
    print(write_chat_dataset())
