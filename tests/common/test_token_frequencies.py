"""The token frequency table of the reduced draft head: counting with the chat template, the top tokens, the
file's round trip, and clear refusals of a table for another vocabulary or tokenizer, or a corrupted file."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hat.common.token_frequencies import (FREQUENCY_TABLE, FrequencyTable, FrequencyTableMismatchError,
                                          count_frequencies, tokenizer_fingerprint)

WORDS = ["<unk>", "<s>", "</s>", "a", "b", "c", "USER", "BOT"]


def word_tokenizer(words=WORDS) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")
    fast.chat_template = ("{% for m in messages %}{{ 'USER' if m['role'] == 'user' else 'BOT' }} {{ m['content'] }} "
                          "{% endfor %}")
    return fast


CONVERSATIONS = [[{"role": "user", "content": "a a b"}, {"role": "assistant", "content": "c a"}],
                 [{"role": "user", "content": "b"}, {"role": "assistant", "content": "a"}],
                 [{"role": "user", "content": "c c c c c"}]]


def test_counts_follow_the_chat_template_and_stop_at_the_budget():
    tokenizer = word_tokenizer()
    table = count_frequencies(tokenizer, len(WORDS), CONVERSATIONS, max_tokens=10**6)
    # USER a a b BOT c a | USER b BOT a | USER c c c c c
    assert table.counts == (0, 0, 0, 4, 2, 6, 3, 2)
    assert table.top(3) == [3, 5, 6] and table.top(1) == [5]
    assert table.coverage(2) == pytest.approx(10 / 17)
    short = count_frequencies(tokenizer, len(WORDS), CONVERSATIONS, max_tokens=7)  # stops after a whole conversation
    assert sum(short.counts) == 7 and short.source.startswith("1 conversations")
    with pytest.raises(ValueError, match="size"):
        table.top(0)


def test_round_trip_and_mismatch_errors(tmp_path):
    tokenizer = word_tokenizer()
    table = count_frequencies(tokenizer, len(WORDS), CONVERSATIONS, max_tokens=10**6)
    table.save(tmp_path)
    loaded = FrequencyTable.load(tmp_path)
    assert loaded == table
    loaded.check_matches(len(WORDS), tokenizer_fingerprint(tokenizer))
    with pytest.raises(FrequencyTableMismatchError, match="vocabulary of 8 tokens.*has 9"):
        loaded.check_matches(9, tokenizer_fingerprint(tokenizer))
    other = word_tokenizer(["<unk>", "<s>", "</s>", "a", "c", "b", "USER", "BOT"])  # same size, ids swapped
    with pytest.raises(FrequencyTableMismatchError, match="tokenizer"):
        loaded.check_matches(len(WORDS), tokenizer_fingerprint(other))


@pytest.mark.parametrize("corrupt", [
    lambda d: "not json",
    lambda d: json.dumps({**d, "counts": d["counts"][:-1]}),
    lambda d: json.dumps({**d, "counts": [-1] * len(d["counts"])}),
    lambda d: json.dumps({**d, "format_version": 99}),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "vocab_size"}),
])
def test_a_corrupted_table_is_refused(tmp_path, corrupt):
    table = count_frequencies(word_tokenizer(), len(WORDS), CONVERSATIONS, max_tokens=10**6)
    path = table.save(tmp_path)
    path.write_text(corrupt(json.loads(path.read_text())))
    with pytest.raises(ValueError, match="not a valid frequency table"):
        FrequencyTable.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=FREQUENCY_TABLE):
        FrequencyTable.load(tmp_path / "missing")
