"""The trainer's pre-flight refuses data prepared for another vocabulary than the model's, in
one line before any Megatron work: ids beyond the vocabulary (they used to crash at iteration 1
with ``IndexError: index out of range in self`` in the embedding, or stop with a non-finite
loss), a recorded tokenizer larger than the vocabulary; a far smaller one is a warning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eaft_megatron.data import preprocess
from tests.support.data import CHATML_SPECIAL, CHATML_TEMPLATE, save_hf_dir, train_bpe, write_jsonl
from tests.support.launch import run_module
from tests.support.tiny_models import TRAIN_VOCAB, train_config

CHAT = [{"messages": [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"},
                      {"role": "assistant", "content": "over the lazy dog the quick fox"}]}] * 4
TRAIN = ["--train-iters", "1", "--micro-batch-size", "1", "--global-batch-size", "1",
         "--lr", "1e-4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 300-id model (config only: the pre-flight reads no weights), a 4096-id one, a ~430-id
    chat tokenizer, data it prepared, and tokenized data with ids up to 2047 and below 300."""
    root = tmp_path_factory.mktemp("vocab")
    models = {}
    for vocab in (TRAIN_VOCAB, 4096):
        config = train_config()
        config.vocab_size = vocab
        config.save_pretrained(root / f"model{vocab}")
        models[vocab] = root / f"model{vocab}"
    tokenizer = save_hf_dir(train_bpe(CHATML_SPECIAL), root / "tokenizer",
                            template=CHATML_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>")
    chat = root / "chat"
    preprocess([write_jsonl(root / "chat.jsonl", CHAT)], tokenizer=tokenizer, output_prefix=chat,
               seq_length=64, progress=False)
    small = root / "small"  # the same tokenizer's data, every id < 300
    preprocess([write_jsonl(root / "small.jsonl", [{"input_ids": [5, 6, 7, 299]}])],
               tokenizer=tokenizer, fmt="tokenized", output_prefix=small, seq_length=64,
               progress=False)
    wide = root / "wide"  # prepared without a tokenizer, ids up to 2047, max id not recorded
    preprocess([write_jsonl(root / "wide.jsonl", [{"input_ids": [3, 2047, 9]},
                                                  {"input_ids": [1, 2]}])],
               fmt="tokenized", output_prefix=wide, seq_length=64, progress=False)
    fits = root / "fits"  # without a tokenizer, ids < 300
    preprocess([write_jsonl(root / "fits.jsonl", [{"input_ids": [5, 6, 7]}])], fmt="tokenized",
               output_prefix=fits, seq_length=64, progress=False)
    summary_path = root / "wide_summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["max_token_id"] == 2047
    del summary["max_token_id"]  # as written before it was recorded: read from the .bin
    summary_path.write_text(json.dumps(summary))
    return {"models": models, "tokenizer": tokenizer, "chat": chat, "small": small, "wide": wide,
            "fits": fits}


def test_ids_beyond_the_vocabulary_stop_the_trainer_in_one_line(setup):
    """A real trainer process stops in its pre-flight (exit 2, one line, nothing written)."""
    summary = json.loads(setup["chat"].with_name("chat_summary.json").read_text())
    tokens = np.fromfile(str(setup["chat"]) + "_tokens.bin", dtype=summary["token_dtype"])
    top = int(tokens.max())  # independent of the recorded value
    assert summary["max_token_id"] == top >= TRAIN_VOCAB
    save = setup["chat"].parent / "run"
    res = run_module("eaft_megatron.train", "--hf-config", setup["models"][TRAIN_VOCAB],
                     "--data-path", setup["chat"], "--save", save, *TRAIN)
    assert res.returncode == 2, res.stderr[-3000:]
    # torch's own "No CUDA runtime is found" notice may come first, nothing after the line
    lines = [x for x in res.stderr.splitlines() if x.strip() and "No CUDA runtime" not in x]
    assert lines == [
        f"eaft_megatron.train: error: --data-path {setup['chat']} holds token id {top}, the "
        f"model's vocabulary has 300 ids (0-299); it was tokenized with {setup['tokenizer']} "
        f"({summary['tokenizer']['vocab_size']} ids): prepare the data again with the model's "
        f"own tokenizer (eaft-megatron preprocess --tokenizer <the model's Hugging Face "
        f"directory>)"], res.stderr[-3000:]
    assert not save.exists()


def test_recorded_tokenizer_and_ids_read_from_the_files(setup, capsys):
    from eaft_megatron.train.argv import TrainArgError, complete_argv

    def complete(vocab, *data):
        return complete_argv(["--hf-config", str(setup["models"][vocab]), *data, *TRAIN],
                             cpu=True, te_available=False)

    # the maximum not recorded (an older dataset): read from the .bin; a validation set too
    with pytest.raises(TrainArgError, match=f"--valid-data-path {setup['wide']} holds token id "
                       "2047, the model's vocabulary has 300 ids \\(0-299\\): prepare"):
        complete(TRAIN_VOCAB, "--train-data-path", str(setup["fits"]), "--valid-data-path",
                 str(setup["wide"]))
    # ids that fit, from a tokenizer larger than the model's vocabulary: not its tokenizer
    size = json.loads(setup["small"].with_name("small_summary.json").read_text())["tokenizer"][
        "vocab_size"]
    assert size > TRAIN_VOCAB
    with pytest.raises(TrainArgError, match=f"--data-path {setup['small']} was tokenized with "
                       f"{setup['tokenizer']} \\({size} ids\\), more than the model's "
                       f"vocabulary of 300: not the model's tokenizer \\(this data's ids fit "
                       f"only by chance, largest 299\\)"):
        complete(TRAIN_VOCAB, "--data-path", str(setup["small"]))
    # a far smaller tokenizer on a bigger model: a warning, the run goes on
    capsys.readouterr()
    complete(4096, "--data-path", str(setup["chat"]))
    ours = [x for x in capsys.readouterr().err.splitlines() if x.startswith("eaft_megatron")]
    assert ours == [f"eaft_megatron.train: warning: --data-path {setup['chat']} was tokenized "
                    f"with {setup['tokenizer']} ({size} ids), far fewer than the model's "
                    f"vocabulary of 4096: is it the model's tokenizer? (training goes on: its "
                    f"ids are valid rows)"]
    complete(4096, "--data-path", str(setup["wide"]))  # no tokenizer recorded, ids fit: silent
    assert "eaft_megatron" not in capsys.readouterr().err
