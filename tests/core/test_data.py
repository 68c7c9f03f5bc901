"""JSONL dataset validation, the held-out split and length statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import (
    DatasetError,
    Example,
    LineError,
    LineTooLong,
    examples_at_step,
    iter_byte_lines,
    length_stats,
    load_dataset,
    missing_fields,
    read_jsonl,
    split_heldout,
)
from core.errors import InvalidInput


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _errors(report) -> list[tuple[int, str | None]]:
    return [(e.line, e.field) for e in report.errors]


# --- valid lines ------------------------------------------------------------------------------


def test_prompt_line():
    report = read_jsonl([_line({"prompt": "2+2?", "answer": "4", "demonstration": "4"})])
    assert report.ok
    assert report.lines == 1
    (example,) = report.examples
    assert example.prompt == "2+2?"
    assert example.prompt_text == "2+2?"
    assert example.demonstration == "4"
    assert example.fields == {"answer": "4", "demonstration": "4"}
    assert example.line == 1
    assert report.with_demonstration == 1


def test_messages_line():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    report = read_jsonl([_line({"messages": messages, "answer": 4})])
    assert report.ok
    (example,) = report.examples
    assert example.prompt == messages
    assert example.prompt_text == "Be brief.\n2+2?"
    assert example.demonstration is None
    assert example.fields == {"answer": 4}
    assert report.with_demonstration == 0


def test_final_assistant_message_is_the_demonstration():
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]
    report = read_jsonl([_line({"messages": messages})])
    assert report.ok
    (example,) = report.examples
    assert example.prompt == [{"role": "user", "content": "2+2?"}]
    assert example.demonstration == "It is 4."


def test_openai_weights_mark_assistant_turns_as_context():
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "5", "weight": 0},
        {"role": "user", "content": "Try again."},
        {"role": "assistant", "content": "4", "weight": 1},
    ]
    (example,) = read_jsonl([_line({"messages": messages})]).examples
    assert example.demonstration == "4"
    assert example.prompt == [{k: m[k] for k in ("role", "content")} for m in messages[:3]]


# --- bad lines --------------------------------------------------------------------------------


BAD_LINES = [
    (b'{"prompt": "x",}\n', None, "not valid JSON"),
    (b"[1, 2]\n", None, "expected a JSON object, got array"),
    (b'"just text"\n', None, "got string"),
    (b'{"answer": "4"}\n', None, "exactly one of"),
    (_line({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}), None, "exactly one of"),
    (_line({"prompt": 5}), "prompt", "got number"),
    (_line({"prompt": ""}), "prompt", "non-empty string"),
    (_line({"prompt": "   "}), "prompt", "non-empty string"),
    (_line({"messages": "hi"}), "messages", "non-empty list, got string"),
    (_line({"messages": []}), "messages", "non-empty list"),
    (_line({"messages": ["hi"]}), "messages[0]", "got string"),
    (_line({"messages": [{"role": "bot", "content": "x"}]}), "messages[0].role", "got 'bot'"),
    (_line({"messages": [{"role": "user", "content": 3}]}), "messages[0].content", "got number"),
    (_line({"messages": [{"role": "system", "content": "x"}]}), "messages", "end with a user message"),
    (_line({"messages": [{"role": "assistant", "content": "x"}]}), "messages", "end with a user message"),
    (
        _line(
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "demonstration": "a",
            }
        ),
        "demonstration",
        "given twice",
    ),
    (
        _line(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 0},
                ]
            }
        ),
        "messages[1].weight",
        "weight 0 trains nothing",
    ),
    (
        _line(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 2},
                ]
            }
        ),
        "messages[1].weight",
        "is 0 or 1 on an assistant message, got 2",
    ),
    (
        _line({"messages": [{"role": "user", "content": "q", "weight": 1}]}),
        "messages[0].weight",
        "got 1 on 'user'",
    ),
    (
        _line(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": True},
                ]
            }
        ),
        "messages[1].weight",
        "got true",
    ),
    (_line({"prompt": "x", "demonstration": 3}), "demonstration", "got number"),
    (_line({"prompt": "x", "demonstration": " "}), "demonstration", "non-empty string"),
]


@pytest.mark.parametrize(("raw", "field", "message"), BAD_LINES)
def test_bad_line_is_reported_with_line_and_field(raw, field, message):
    good = _line({"prompt": "fine"})
    report = read_jsonl([good, raw, good])
    assert not report.ok
    assert report.error_count == len(report.errors) >= 1
    assert (2, field) in _errors(report)
    assert any(message in e.message for e in report.errors if e.field == field), report.errors
    assert all(e.line == 2 for e in report.errors)
    assert [e.line for e in report.examples] == [1, 3]  # the bad line never stops the others


def test_every_bad_line_is_reported():
    lines = [
        _line({"prompt": "ok"}),
        b"{oops\n",
        _line({"prompt": 1}),
        _line({"messages": [{"role": "bot", "content": 1}]}),
        _line({"prompt": "ok again"}),
    ]
    report = read_jsonl(lines)
    assert _errors(report) == [
        (2, None),
        (3, "prompt"),
        (4, "messages[0].role"),
        (4, "messages[0].content"),
    ]
    assert report.error_count == 4
    assert len(report.examples) == 2
    assert str(report.errors[1]) == "line 3, field 'prompt': must be a non-empty string, got number"
    summary = report.summary()
    assert summary["lines"] == 5
    assert summary["examples"] == 2
    assert summary["error_count"] == 4
    assert summary["errors"][0]["line"] == 2


def test_reported_errors_are_capped_but_counted():
    report = read_jsonl([b"nope\n"] * 150)
    assert report.error_count == 150
    assert len(report.errors) == 100


def test_non_utf8_bytes():
    report = read_jsonl([_line({"prompt": "ok"}), b'{"prompt": "\xff"}\n'])
    assert _errors(report) == [(2, None)]
    # '{"prompt": "' is 12 bytes, so the bad byte is the 13th
    assert report.errors[0].message == "not valid UTF-8 (byte 13 of the line)"


def test_utf8_bom_on_first_line_is_accepted():
    report = read_jsonl([b"\xef\xbb\xbf" + _line({"prompt": "caf\u00e9"})])
    assert report.ok
    assert report.examples[0].prompt == "caf\u00e9"


def test_crlf_and_blank_lines():
    lines = [b'{"prompt": "a"}\r\n', b"\r\n", b"   \n", b"\n", b'{"prompt": "b"}\r\n', b'{"prompt": "c"}']
    report = read_jsonl(lines)
    assert report.ok
    assert [(e.prompt, e.line) for e in report.examples] == [("a", 1), ("b", 5), ("c", 6)]
    assert report.lines == 6


def test_json_nesting_bomb_is_reported_not_raised():
    report = read_jsonl([b"[" * 100_000 + b"\n", _line({"prompt": "after"})])
    assert _errors(report) == [(1, None)]
    assert "nested too deeply" in report.errors[0].message
    assert [e.prompt for e in report.examples] == ["after"]


def test_line_over_the_limit_in_memory():
    report = read_jsonl([_line({"prompt": "x" * 100}), _line({"prompt": "ok"})], max_line_bytes=50)
    assert _errors(report) == [(1, None)]
    assert report.errors[0].message == "line is 115 bytes, over the limit of 50"
    assert [e.line for e in report.examples] == [2]


# --- files ------------------------------------------------------------------------------------


def test_long_line_in_a_file_is_skipped_and_measured(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    long_line = _line({"prompt": "x" * 5000})  # 5015 bytes with the newline
    assert len(long_line) == 5015
    path.write_bytes(_line({"prompt": "first"}) + long_line + _line({"prompt": "last"}))
    lines = list(iter_byte_lines(path, max_line_bytes=1000))
    assert lines[1] == LineTooLong(5015)
    assert lines[2] == _line({"prompt": "last"})
    report = read_jsonl(iter_byte_lines(path, max_line_bytes=1000), max_line_bytes=1000)
    assert _errors(report) == [(2, None)]
    assert report.errors[0].message == "line is 5,015 bytes, over the limit of 1,000"
    assert [e.prompt for e in report.examples] == ["first", "last"]


def test_long_last_line_without_newline(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_line({"prompt": "first"}) + b'{"prompt": "' + b"y" * 3000 + b'"}')
    report = read_jsonl(iter_byte_lines(path, max_line_bytes=1000), max_line_bytes=1000)
    assert report.errors == [LineError(2, None, "line is 3,014 bytes, over the limit of 1,000")]
    assert len(report.examples) == 1


def test_load_dataset(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_line({"prompt": "a", "answer": 1}) + _line({"prompt": "b", "answer": 2}))
    examples = load_dataset(path)
    assert [(e.prompt, e.fields["answer"]) for e in examples] == [("a", 1), ("b", 2)]


def test_load_dataset_error_names_the_line(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_line({"prompt": "a"}) + _line({"prompt": "b"}) + _line({"prompt": 7}))
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3, field 'prompt'" in message
    assert info.value.report.error_count == 1


def test_load_dataset_empty_file_is_not_ok(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert not read_jsonl(iter_byte_lines(path)).ok
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(path)
    path.write_bytes(b"\n\n  \n")
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(path)


def test_load_dataset_missing_file(tmp_path: Path):
    with pytest.raises(InvalidInput, match="dataset not found"):
        load_dataset(tmp_path / "nope.jsonl")


# --- helpers ----------------------------------------------------------------------------------


def _examples(n: int) -> list[Example]:
    return [Example(prompt=f"p{i}", demonstration=None, fields={"i": i}, line=i + 1) for i in range(n)]


def test_split_heldout():
    examples = _examples(20)
    train, heldout = split_heldout(examples, 5, seed=3)
    assert len(train) == 15
    assert len(heldout) == 5
    assert {e.line for e in train}.isdisjoint(e.line for e in heldout)
    assert sorted(e.line for e in train + heldout) == list(range(1, 21))
    # both keep the file order
    assert [e.line for e in train] == sorted(e.line for e in train)
    assert [e.line for e in heldout] == sorted(e.line for e in heldout)
    # deterministic for a seed, different for another
    assert split_heldout(examples, 5, seed=3) == (train, heldout)
    others = {tuple(e.line for e in split_heldout(examples, 5, seed=s)[1]) for s in range(10)}
    assert len(others) > 1


def test_examples_at_step_visit_every_example_once_per_epoch_in_a_seeded_order():
    pool = list(range(6))
    epoch_0 = examples_at_step(pool, 0, 3, "s") + examples_at_step(pool, 1, 3, "s")
    epoch_1 = examples_at_step(pool, 2, 3, "s") + examples_at_step(pool, 3, 3, "s")
    assert sorted(epoch_0) == sorted(epoch_1) == pool
    assert epoch_0 != epoch_1  # a new shuffle each epoch (this seed)
    assert examples_at_step(pool, 1, 3, "s") == epoch_0[3:]  # any step, without the ones before
    assert examples_at_step(pool, 0, 4, "s")[3] == examples_at_step(pool, 1, 3, "s")[0]
    assert examples_at_step(pool, 0, 6, "other") != epoch_0
    assert examples_at_step(pool, 0, 8, "s") == epoch_0 + epoch_1[:2]  # a batch across epochs


def test_split_heldout_sizes():
    examples = _examples(4)
    assert split_heldout(examples, 0, seed=0) == (examples, [])
    train, heldout = split_heldout(examples, 3, seed=0)
    assert (len(train), len(heldout)) == (1, 3)
    with pytest.raises(InvalidInput, match=r"data\.eval_size 4 leaves no training examples"):
        split_heldout(examples, 4, seed=0)
    with pytest.raises(InvalidInput):
        split_heldout(examples, 5, seed=0)


def test_missing_fields():
    examples = [
        Example(prompt="a", demonstration=None, fields={"answer": 1, "gold": 2}, line=1),
        Example(prompt="b", demonstration=None, fields={"answer": 1}, line=2),
        Example(prompt="c", demonstration=None, fields={}, line=5),
    ]
    problems = missing_fields(examples, {"gold", "answer"})
    assert [(p.line, p.field) for p in problems] == [(2, "gold"), (5, "answer"), (5, "gold")]
    assert missing_fields(examples, set()) == []


def test_length_stats():
    assert length_stats([]) == {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    assert length_stats([7]) == {"min": 7, "mean": 7.0, "p50": 7, "p95": 7, "max": 7}
    # sorted 1,2,3: p50 index 1; p95 index round(0.95 * 2) = 2
    assert length_stats([3, 1, 2]) == {"min": 1, "mean": 2.0, "p50": 2, "p95": 3, "max": 3}
    # 1..10: mean 5.5; p50 index (10 - 1) // 2 = 4 -> 5; p95 index round(8.55) = 9 -> 10
    assert length_stats(list(range(10, 0, -1))) == {"min": 1, "mean": 5.5, "p50": 5, "p95": 10, "max": 10}
    # 1..21: p95 index round(0.95 * 20) = 19 -> 20; mean of 1, 2, 4 is 2.33
    assert length_stats(list(range(1, 22)))["p95"] == 20
    assert length_stats([1, 2, 4])["mean"] == 2.33
