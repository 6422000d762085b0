"""DailyDialog: release zips, undoing the tokenised spacing, and the chat format."""

import zipfile

import pytest

from model.dialog import detokenize, parse_dialogues, read_split_zip, render_chat


@pytest.mark.parametrize(
    ("tokenised", "expected"),
    [
        ("I ' m fine , thanks !", "I'm fine, thanks!"),
        ("Let ' s go .", "Let's go."),
        ("I do n't know .", "I don't know."),
        ("It costs $ 5 .", "It costs $5."),
        ("You ' re right ; we ' ll see ?", "You're right; we'll see?"),
        ("She said ( quietly ) no .", "She said (quietly) no."),
        ("It ’ s 50 % off :", "It's 50% off:"),
    ],
)
def test_detokenize_glues_dailydialog_spacing(tokenised, expected):
    assert detokenize(tokenised) == expected


def test_detokenize_keeps_words_that_merely_start_like_contractions():
    assert detokenize("He ' said ' sure .") == "He ' said ' sure."


def test_detokenize_collapses_double_spaces_and_trims():
    assert detokenize("  Hello   there  ") == "Hello there"


def test_parse_dialogues_splits_turns_at_eou_and_skips_blank_lines():
    text = "Hi , Tom ! __eou__ Hello . How ' s it going ? __eou__\n\n   \nGood night . __eou__ Night ! __eou__ \n"
    assert parse_dialogues(text) == [["Hi, Tom!", "Hello. How's it going?"], ["Good night.", "Night!"]]


def test_read_split_zip_reads_the_split_member(tmp_path, make_dailydialog):
    root = make_dailydialog(
        tmp_path,
        {
            "validation": [
                "Are you coming ? __eou__ I ' m on my way . __eou__ Great , see you ! __eou__",
                "What ' s the price ? __eou__ It ' s $ 20 . __eou__",
            ],
        },
    )
    assert read_split_zip(root / "validation.zip", "validation") == [
        ["Are you coming?", "I'm on my way.", "Great, see you!"],
        ["What's the price?", "It's $20."],
    ]


def test_read_split_zip_names_the_member_a_zip_lacks(tmp_path, make_dailydialog):
    root = make_dailydialog(tmp_path, {"train": ["Hi . __eou__ Hello . __eou__"]})
    (root / "train.zip").rename(root / "test.zip")
    with pytest.raises(ValueError) as info:
        read_split_zip(root / "test.zip", "test")
    assert "test/dialogues_test.txt" in str(info.value)


def test_read_split_zip_rejects_a_file_that_is_not_a_zip(tmp_path):
    path = tmp_path / "train.zip"
    path.write_text("not a zip at all", encoding="utf-8")
    with pytest.raises(ValueError, match="zip"):
        read_split_zip(path, "train")


def test_read_split_zip_rejects_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "train.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train/dialogues_train.txt", b"Caf\xe9 ? __eou__ Oui . __eou__\n")
    with pytest.raises(ValueError, match="UTF-8"):
        read_split_zip(path, "train")


def test_render_chat_alternates_user_and_assistant_lines():
    assert render_chat(["Hi there.", "Hello! How can I help?", "Nothing, thanks."]) == (
        "<|user|>\nHi there.\n<|assistant|>\nHello! How can I help?\n<|user|>\nNothing, thanks.\n"
    )


def test_render_chat_of_a_single_exchange():
    assert render_chat(["a", "b"]) == "<|user|>\na\n<|assistant|>\nb\n"
