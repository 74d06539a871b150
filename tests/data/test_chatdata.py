"""Chat data readers: every format read from a real file, detection, file:line errors, the val split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kititans.data.chatdata import (
    Conversation,
    builtin_conversations,
    read_chat_data,
    read_chat_file,
    split_conversations,
)
from kititans.errors import KititansError

ALPACA_DEMO = Path("/work/shared/data/instruct/alpaca_en_demo.json")


def roles(conv: Conversation) -> list[str]:
    return [m["role"] for m in conv.messages]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_messages_jsonl_multi_turn(tmp_path):
    f = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi! "},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "What sound does a cow make?"},
                    {"role": "assistant", "content": "A cow says moo."},
                ]
            },
            {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]},
        ],
    )
    convs = read_chat_file(f)
    assert [roles(c) for c in convs] == [
        ["system", "user", "assistant", "user", "assistant"],
        ["user", "assistant"],
    ]
    assert convs[0].messages[1]["content"] == "Hi!"  # trimmed
    assert convs[1].where == f"{f}:2"


def test_alpaca_json_array_with_input_history_and_system(tmp_path):
    f = tmp_path / "alpaca.json"
    recs = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {
            "instruction": "Say hi.",
            "input": "",
            "output": "Hi!",
            "system": "Be kind.",
            "history": [["A?", "B."]],
        },
    ]
    f.write_text(json.dumps(recs, indent=2))
    a, b = read_chat_file(f)
    assert a.messages == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert roles(b) == ["system", "user", "assistant", "user", "assistant"]
    assert b.messages[1]["content"] == "A?" and b.messages[3]["content"] == "Say hi."
    assert a.where == f"{f}:2" and b.where == f"{f}:7"  # the line where each record starts


def test_sharegpt_and_guanaco(tmp_path):
    sg = write_jsonl(
        tmp_path / "sg.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "You help."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            }
        ],
    )
    (c,) = read_chat_file(sg)
    assert c.messages == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    gu = write_jsonl(
        tmp_path / "guanaco.jsonl",
        [{"text": "### Human: What is 2+2?### Assistant: 4.### Human: And 3+3?### Assistant: 6."}],
    )
    (c,) = read_chat_file(gu)
    assert c.messages == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]


def test_plain_text_turn_markers(tmp_path):
    f = tmp_path / "chats.txt"
    f.write_text(
        "<system> Be nice.\n<user> Tell me a story.\n<assistant> Once upon a time.\n\nThe end.\n"
        "<user> Thanks!\n<assistant> You are welcome.\n\n"
        "<user>\nWhat color is a pig?\n<assistant>\nA pig is pink.\n---\n"
        "<user> Hi\n<assistant> Hello\n"
    )
    a, b, c = read_chat_file(f)
    assert roles(a) == ["system", "user", "assistant", "user", "assistant"]
    assert a.messages[2]["content"] == "Once upon a time.\n\nThe end."  # blank lines inside a reply stay
    assert b.messages == [
        {"role": "user", "content": "What color is a pig?"},
        {"role": "assistant", "content": "A pig is pink."},
    ]
    assert (a.where, b.where, c.where) == (f"{f}:1", f"{f}:9", f"{f}:14")


def test_format_flag_overrides_detection(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"text": "### Human: Hi### Assistant: Hello"}])
    assert read_chat_file(f, "guanaco")[0].messages[1]["content"] == "Hello"
    with pytest.raises(KititansError, match=rf"^{f}:1: the alpaca record has no 'instruction' text"):
        read_chat_file(f, "alpaca")


BAD = [
    ("roles.jsonl", ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                     '{"messages": [{"role": "bot", "content": "a"}]}'], 2, "unknown role 'bot'"),
    ("empty.jsonl", ['{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}'],
     1, "empty content in message 1"),
    ("ends.jsonl", ['{"messages": [{"role": "user", "content": "a"}]}'], 1, "must end with an assistant reply"),
    ("order.jsonl", ['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
                     '{"role": "assistant", "content": "c"}]}'], 1, "message 2 has role 'user' where 'assistant' was expected"),
    ("json.jsonl", ["", "", '{"messages": [}'], 3, "not valid JSON"),
    ("sg.jsonl", ['{"conversations": [{"from": "bing", "value": "x"}]}'], 1, "unknown role 'bing'"),
    ("alpaca.jsonl", ['{"instruction": "a", "input": "", "output": ""}'], 1, "empty content in message 2"),
    ("what.jsonl", ['{"prompt": "a", "completion": "b"}'], 1, "cannot tell the chat format"),
    ("text.txt", ["<user> a", "<assistant> b", "", "<user> c"], 4, "must end with an assistant reply"),
    ("free.txt", ["hello", "<user> a"], 1, "text outside a turn"),
    ("array.json", ["[", '  {"instruction": "a", "output": "b"},', '  {"instruction": "a",', '   "output": 3}', "]"],
     3, "the alpaca record has no 'output' text"),
    ("broken.json", ["[", '  {"instruction": "a", "output": "b"}', '  {"instruction": "c", "output": "d"}', "]"],
     3, "not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize("name, lines, line, message", BAD, ids=[b[0] for b in BAD])
def test_bad_records_are_one_line_errors_with_file_and_line(tmp_path, name, lines, line, message):
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(KititansError) as e:
        read_chat_file(f)
    text = str(e.value)
    assert text.startswith(f"{f}:{line}:") and message in text and "\n" not in text, text


def test_directories_and_missing_files(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", [])
    write_jsonl(
        tmp_path / "d" / "b.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    assert len(read_chat_data([str(tmp_path / "d")])) == 1
    with pytest.raises(KititansError, match="no such file or directory"):
        read_chat_data([str(tmp_path / "nope.jsonl")])
    with pytest.raises(KititansError, match="no conversations"):
        read_chat_data([str(tmp_path / "d" / "a.jsonl")])


@pytest.mark.skipif(not ALPACA_DEMO.is_file(), reason=f"{ALPACA_DEMO} is not on this machine")
def test_real_alpaca_file_is_detected_and_read():
    convs = read_chat_file(ALPACA_DEMO)
    assert len(convs) == 999  # data/instruct/SOURCE.md: 999 records, 412 with an input
    assert all(roles(c) == ["user", "assistant"] for c in convs)
    assert sum("\n\n" in c.messages[0]["content"] for c in convs) >= 412
    assert convs[0].messages[0]["content"] == "Describe a process of making crepes."


def test_split_is_deterministic_by_content():
    convs = builtin_conversations(0, 600)
    train, val = split_conversations(convs, 0.1, seed=0)
    assert len(train) + len(val) == 600 and 20 < len(val) < 110
    val2 = split_conversations(list(reversed(convs)), 0.1, seed=0)[1]
    assert {c.key() for c in val2} == {c.key() for c in val}  # file order does not matter
    assert not {c.key() for c in val} & {c.key() for c in train}  # duplicates stay on one side
    other = split_conversations(convs, 0.1, seed=1)[1]
    assert {c.key() for c in other} != {c.key() for c in val}
    two = builtin_conversations(0, 2)
    assert [len(s) for s in split_conversations(two, 0.01)] == [1, 1]
