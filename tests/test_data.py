"""Data: record forms, malformed lines (file:line in the message), chat spans, response-only targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from srppo_fast.data import read_records
from srppo_fast.errors import DataError
from srppo_fast.tokens import DEFAULT_CHAT_TEMPLATE, load_lm_data, render, render_with_spans, tokenize_records

from .helpers import require


def jsonl(tmp_path, lines, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


BAD_LINES = [
    ('{"prompt": "1+1", "response": "2"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ({"question": "1+1"}, "expected 'prompt' and 'response', 'messages', or 'text'"),
    ({"prompt": 3, "response": "x"}, "'prompt' must be a string, got int"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0] must be {'role': one of system/user/assistant"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "must start with a user turn"),
    ({"prompt": "1+1"}, "no response to learn from"),
    ({"text": "raw"}, "a 'text' record has no prompt"),
]


@pytest.mark.parametrize("line,needle", BAD_LINES)
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    path = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(DataError) as info:
        read_records(path, "sft")
    assert str(info.value).startswith(f"{path}:2: ")
    assert needle in str(info.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="data file 'nope.jsonl' does not exist"):
        read_records("nope.jsonl", "sft")
    with pytest.raises(DataError, match="holds no records"):
        read_records(jsonl(tmp_path, ["", "  "]), "sft")


def test_prompt_kind_drops_the_final_answer_and_keeps_metadata(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "12+30", "response": "answer 42", "task": "add"},
                            {"messages": [{"role": "user", "content": "hi"}]}])
    recs = read_records(path, "prompt")
    assert recs[0].messages == [{"role": "user", "content": "12+30"}]
    assert recs[0].meta == {"task": "add"}
    with pytest.raises(DataError, match="must end with a user turn"):
        read_records(jsonl(tmp_path, [{"messages": [{"role": "user", "content": "u"},
                                                    {"role": "system", "content": "s"}]}], "p.jsonl"), "prompt")


def test_response_targets_are_exactly_the_assistant_tokens(tokenizer):
    messages = [{"role": "user", "content": "12+30"}, {"role": "assistant", "content": "answer 42"},
                {"role": "user", "content": "50-8"}, {"role": "assistant", "content": "answer 42"}]
    text, spans = render_with_spans(tokenizer, messages)
    assert text == "<bos>Q: 12+30\nA: answer 42<eos>Q: 50-8\nA: answer 42<eos>"
    assert [text[a:b] for a, b in spans] == ["answer 42<eos>", "answer 42<eos>"]
    from srppo_fast.data import Record

    ts = tokenize_records([Record("x", messages=messages)], tokenizer, loss_on="response", max_seq_len=64)
    tokens, targets = ts.sequence(0)
    target_text = tokenizer.decode(tokens[targets])
    assert target_text == "answer 42<eos>answer 42<eos>"
    # the prompt alone (with the generation prompt) is a token prefix of prompt + response
    prompt = tokenizer(render(tokenizer, messages[:1], add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    assert list(tokens[:len(prompt)]) == prompt


def test_default_template_when_the_tokenizer_has_none(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    text, spans = render_with_spans(tok, messages)
    assert text == "<bos><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello<eos>\n"
    assert [text[a:b] for a, b in spans] == ["hello<eos>"]  # the newline after EOS is not trained
    assert "{{ eos_token }}" in DEFAULT_CHAT_TEMPLATE


def test_pretraining_text_gets_bos_eos_and_all_targets(tmp_path, tokenizer):
    ts = load_lm_data(jsonl(tmp_path, [{"text": "12+30"}]), tokenizer, kind="lm", loss_on="all", max_seq_len=64)
    tokens, targets = ts.sequence(0)
    assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == tokenizer.eos_token_id
    assert not targets[0] and targets[1:].all()


def test_overlong_policies(tmp_path, tokenizer):
    path = jsonl(tmp_path, [{"prompt": "1+1", "response": "answer 2"},
                            {"prompt": "11+11", "response": "1+1=2; 1+1=2; answer 22 " * 5}])
    kw = dict(kind="sft", loss_on="response", max_seq_len=24)
    dropped = load_lm_data(path, tokenizer, overlong="drop", **kw)
    assert len(dropped) == 1 and dropped.dropped == 1
    cut = load_lm_data(path, tokenizer, overlong="truncate", **kw)
    assert len(cut) == 2 and cut.truncated == 1 and cut.lengths.max() == 24
    with pytest.raises(DataError, match=r"data.jsonl:2: \d+ tokens, more than max_seq_len=24"):
        load_lm_data(path, tokenizer, overlong="error", **kw)


def test_world_splits_load(world_dir, tokenizer):
    ts = load_lm_data("world:demos", tokenizer, kind="sft", loss_on="response", max_seq_len=128,
                      world_dir=world_dir)
    assert len(ts) == 8 and ts.dropped == 0
    assert np.all(ts.offsets[1:] > ts.offsets[:-1])


def test_local_hf_dataset_directory(tmp_path, tokenizer):
    datasets = require("datasets")
    rows = [{"prompt": "1+1", "response": "answer 2"}, {"prompt": "2+2", "response": "answer 4"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = read_records(str(tmp_path / "ds"), "sft")
    assert [r.messages[1]["content"] for r in recs] == ["answer 2", "answer 4"]
    # a directory of data files (what `datasets.load_dataset(dir)` reads), here with a bad row
    (tmp_path / "files").mkdir()
    jsonl(tmp_path / "files", [{"prompt": "1+1", "response": "answer 2"}, {"prompt": "x"}], "train.jsonl")
    with pytest.raises(DataError, match=r"files\[1\]: no response to learn from"):
        read_records(str(tmp_path / "files"), "sft")
