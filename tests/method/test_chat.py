import pytest

from avr_megatron.method.chat import check_text, message, validate_conversation

X = [{"role": "user", "content": "hi"}]


def test_valid_conversation_is_copied():
    conv = [{"role": "system", "content": "be brief"}, *X, {"role": "assistant", "content": "hello"}]
    out = validate_conversation(conv, "x")
    assert out == conv and out[0] is not conv[0]
    assert validate_conversation(X, "x", last_role="user") == X


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hi", r"^x: expected a list of messages"),
        ([], r"^x: conversation is empty"),
        (["hi"], r"^x\[0\]: expected a dict"),
        ([{"role": "user"}], r"^x\[0\]\.content: missing"),
        ([{"content": "a"}], r"^x\[0\]\.role: missing"),
        ([{"role": "user", "content": "a", "name": "bob"}], r"^x\[0\]: unexpected keys \['name'\]"),
        ([{"role": "bot", "content": "a"}], r"^x\[0\]\.role: expected one of system, user, assistant, got 'bot'"),
        ([{"role": "user", "content": "  \n"}], r"^x\[0\]\.content: is empty or whitespace only"),
        ([{"role": "user", "content": 3}], r"^x\[0\]\.content: expected a string, got int"),
        ([{"role": "assistant", "content": "a"}], r"^x\[0\]\.role: expected 'user' \(the first non-system turn"),
        ([*X, {"role": "user", "content": "again"}], r"^x\[1\]\.role: expected 'assistant' \(turns must alternate\)"),
        ([*X, {"role": "system", "content": "s"}], r"^x\[1\]\.role: a system message may only come first"),
        ([{"role": "system", "content": "s"}], r"^x: has no user turn"),
    ],
)
def test_invalid_conversations_name_the_field(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_conversation(messages, "x")


def test_last_role():
    with pytest.raises(ValueError, match=r"^x\[0\]\.role: the conversation must end with a 'assistant' turn, got 'user'"):
        validate_conversation(X, "x", last_role="assistant")


def test_check_text_and_message():
    assert message("user", "a") == {"role": "user", "content": "a"}
    assert check_text(" a ", "f") == " a "
    with pytest.raises(ValueError, match="^f: is empty"):
        check_text("", "f")
