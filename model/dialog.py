"""DailyDialog: reading its release zips, undoing its tokenised spacing, and the chat format."""

import re
import zipfile
import zlib

from model.special_tokens import ASSISTANT, USER

SPLITS = ("train", "validation", "test")
TURN_END = "__eou__"

# DailyDialog was released tokenised: "I ' m fine , thanks !". Each rule glues one kind back.
_DETOKENIZE = [
    (re.compile(r"(\w) ?[’'] ?(s|m|t|d|ll|re|ve)\b"), r"\1'\2"),  # I ' m -> I'm, don ' t -> don't
    (re.compile(r"(\w) n't\b"), r"\1n't"),  # do n't -> don't
    (re.compile(r" ([,.!?;:%)\]}])"), r"\1"),  # fine , -> fine,
    (re.compile(r"([(\[{$]) "), r"\1"),  # ( a -> (a, $ 5 -> $5
    (re.compile(r" {2,}"), " "),
]


def detokenize(turn):
    for pattern, replacement in _DETOKENIZE:
        turn = pattern.sub(replacement, turn)
    return turn.strip()


def parse_dialogues(text):
    """One dialogue per line, turns ending in ` __eou__`; returns lists of detokenised turns."""
    dialogues = []
    for line in text.splitlines():
        turns = [detokenize(turn) for turn in line.split(TURN_END)]
        turns = [turn for turn in turns if turn]
        if turns:
            dialogues.append(turns)
    return dialogues


def read_split_zip(path, split):
    """The dialogues of one release zip (`SPLIT/dialogues_SPLIT.txt` inside)."""
    member = f"{split}/dialogues_{split}.txt"
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(member)
    except KeyError as error:
        raise ValueError(f"{path}: the zip has no '{member}'") from error
    except (zipfile.BadZipFile, zlib.error) as error:  # zlib: a damaged member
        raise ValueError(f"{path}: not a readable zip file ({error})") from error
    # Invalid UTF-8 stops the stage rather than being replaced with U+FFFD: the release is UTF-8 text,
    # so a bad byte means a damaged or wrong file, and dialogues with mangled turns would be trained on.
    try:
        return parse_dialogues(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: '{member}' is not UTF-8 text ({error})") from error


def render_chat(turns):
    """The training format: turns alternate user / assistant, each `ROLE\\nTEXT\\n`.

    The dialogue's closing <|endoftext|> is a control token, appended as an id by the tokenizer.
    """
    return "".join(f"{USER if i % 2 == 0 else ASSISTANT}\n{turn}\n" for i, turn in enumerate(turns))
