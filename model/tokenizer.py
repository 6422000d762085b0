"""The sentencepiece BPE tokenizer: training it, and the one wrapper every other part uses.

Settings follow Llama's tokenizer (identity normalisation, byte fallback, split digits), so the
export later loads as a standard Llama tokenizer. No dummy prefix: encoding a string is then the
concatenation of encoding its pieces split before a space or a special token, which keeps the
chat format and its assistant mask exact.
"""

import io
import itertools
import os
import re

import numpy as np
import sentencepiece as spm

from model.dialog import render_chat
from model.errors import PipelineError
from model.special_tokens import ASSISTANT, ASSISTANT_ID, END_OF_TEXT, END_OF_TEXT_ID, UNK_ID, USER, USER_ID

# sentencepiece skips longer lines while training; paragraphs longer than this are rare.
MAX_SENTENCE_BYTES = 16384
# sentencepiece encodes each whitespace-led word on its own (a run of spaces joins the next word):
# the same split here lets each distinct word be encoded once and reused.
_WORD = re.compile(r"[^ ]+| +[^ ]*")


def bpe_lines(texts):
    """The BPE training input: every non-empty line of `texts` (documents or dialogue turns)."""
    return [line for text in texts for line in text.split("\n") if line]


class CorpusTooSmallError(PipelineError, ValueError):
    """The training text cannot support the requested vocabulary."""


def sample_sentences(lines, max_sentences, seed):
    """At most `max_sentences` of `lines`, chosen with `seed`, in their original order."""
    if len(lines) <= max_sentences:
        return lines
    keep = np.sort(np.random.default_rng(seed).choice(len(lines), size=max_sentences, replace=False))
    return [lines[i] for i in keep]


def train_bpe(sentences, vocab_size, seed):
    """Trains the BPE model on `sentences` (lines without newlines); returns the serialized model."""
    if not sentences:
        raise CorpusTooSmallError("the tokenizer corpus is empty: no text survived extraction and cleaning")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            unk_id=UNK_ID,
            eos_id=END_OF_TEXT_ID,
            eos_piece=END_OF_TEXT,
            bos_id=-1,
            pad_id=-1,
            user_defined_symbols=[USER, ASSISTANT],
            num_threads=os.cpu_count(),
            minloglevel=2,
        )
    except RuntimeError as error:
        limit = re.search(r"<= (\d+)", str(error))
        if "Vocabulary size" in str(error) and limit:
            raise CorpusTooSmallError(
                f"the tokenizer corpus ({len(sentences)} lines, {sum(len(s) for s in sentences)} characters) "
                f"is too small for tokenizer.vocab_size={vocab_size}: it supports at most {limit.group(1)} "
                f"pieces. Lower tokenizer.vocab_size or raise the extraction caps."
            ) from error
        raise
    return model.getvalue()


# The first byte of a 2-, 3- and 4-byte UTF-8 character: (mask, value).
UTF8_LEADS = ((0xE0, 0xC0), (0xF0, 0xE0), (0xF8, 0xF0))
ROLE_STRINGS = re.compile(f"({re.escape(USER)}|{re.escape(ASSISTANT)})")


class Tokenizer:
    """Text <-> token ids, plus the chat format with its assistant mask."""

    def __init__(self, model_file):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        for piece, expected in ((END_OF_TEXT, END_OF_TEXT_ID), (USER, USER_ID), (ASSISTANT, ASSISTANT_ID)):
            if self.sp.piece_to_id(piece) != expected:
                raise ValueError(f"{model_file}: not a tokenizer of this project ({piece} is not id {expected})")
        # Tokens that end a generated document, and an assistant reply: a reply is one line, so its
        # newline (a byte piece: BPE never saw one, it trains on single lines) ends the turn as well.
        self.document_end_ids = (END_OF_TEXT_ID,)
        self.reply_end_ids = (END_OF_TEXT_ID, USER_ID, self.sp.piece_to_id("<0x0A>"))

    def encode(self, text):
        return self.sp.encode(text)

    def encode_documents(self, texts):
        """One uint16 array of all `texts`, each followed by <|endoftext|>; equal to encoding each text.

        Fast path for corpora: every distinct word is encoded once, then the token ids are gathered
        with numpy (about 1.3x sentencepiece on the whole text, per core; BENCHMARKS.md).
        """
        word_index = {}
        sequence = []
        for text in texts:
            sequence.extend([word_index.setdefault(word, len(word_index)) for word in _WORD.findall(text)])
            sequence.append(-1)  # numpy reads -1 as the last table entry: <|endoftext|>
        encoded = self.sp.encode(list(word_index))
        lengths = np.array([len(ids) for ids in encoded] + [1], dtype=np.int64)
        table = np.fromiter(
            itertools.chain(itertools.chain.from_iterable(encoded), [END_OF_TEXT_ID]),
            dtype=np.uint16,
            count=int(lengths.sum()),
        )
        table_starts = np.cumsum(lengths) - lengths
        sequence = np.array(sequence, dtype=np.int64)
        out_lengths = lengths[sequence]
        out_starts = np.cumsum(out_lengths) - out_lengths
        # Position p of word k's output reads table[table_starts[k] + (p - out_starts[k])].
        gather = np.repeat(table_starts[sequence] - out_starts, out_lengths) + np.arange(int(out_lengths.sum()))
        return table[gather]

    def decode(self, ids):
        """The text of `ids`; a byte that is no part of a whole UTF-8 character is U+FFFD (one per byte)."""
        return self.sp.decode(list(ids))

    def _byte(self, token):
        """The byte a byte piece (`<0xNN>`) stands for."""
        return int(self.sp.id_to_piece(token)[3:5], 16)

    def unfinished_character_bytes(self, ids):
        """How many bytes at the end of `ids`' text start a UTF-8 character they do not finish (0 to 3): byte
        pieces that later tokens may still complete, which `decode` shows as U+FFFD until then."""
        tail = []
        for token in reversed(ids[-3:]):
            if not self.sp.is_byte(token):
                break
            tail.insert(0, self._byte(token))
        for start in range(len(tail) - 1, -1, -1):
            if tail[start] & 0xC0 == 0x80:  # a continuation byte: look further back for the character's start
                continue
            needed = next(
                (length for length, (mask, lead) in enumerate(UTF8_LEADS, 2) if tail[start] & mask == lead), 1
            )
            return len(tail) - start if len(tail) - start < needed else 0
        return 0

    def token_text(self, token):
        """(text, UTF-8 bytes) of one token as OpenAI's logprobs show it: a control token is its piece
        (`<|endoftext|>`), and a byte piece that is part of a longer character is 'bytes:\\xNN'."""
        if self.sp.is_byte(token):
            byte = self._byte(token)
            return (chr(byte) if byte < 128 else f"bytes:\\x{byte:02x}"), [byte]
        text = self.sp.id_to_piece(token) if self.sp.is_control(token) else self.decode([token])
        return text, list(text.encode("utf-8"))

    def decoded_bytes(self, token):
        """The UTF-8 bytes `token` adds to a decoded text: a control token adds none, a byte piece its byte
        (maybe a part of a character)."""
        if self.sp.is_control(token):
            return b""
        return bytes(self.token_text(token)[1])

    def longest_piece_chars(self):
        """The length, in characters, of the longest piece. Text is kept as it is (identity normalisation), so
        no token covers more characters than this."""
        return max(len(self.sp.id_to_piece(token)) for token in range(self.vocab_size))

    def document_prompt(self, text):
        """Ids for continuing `text` as a fresh document (training put <|endoftext|> before each)."""
        return [END_OF_TEXT_ID] + self.document_text(text)

    def document_text(self, text):
        """Ids of a document's `text`: a literal `<|endoftext|>` in it is the token that ends a document, as
        transformers, vLLM and llama.cpp read a prompt (a client may send several documents in one); role strings
        stay characters (`encode_text`)."""
        ids = []
        for i, part in enumerate(text.split(END_OF_TEXT)):
            ids += ([END_OF_TEXT_ID] if i else []) + self.encode_text(part)
        return ids

    def chat_prompt(self, turns):
        """Ids of a conversation so far (user first), ending where the assistant's reply starts.

        Role tokens come only from the turn structure: a turn whose text spells `<|assistant|>` gets
        that text as characters, so no message can forge a turn. Line by line, as `encode_chat`
        shows to equal encoding the whole rendered text.
        """
        ids = []
        for i, turn in enumerate(turns):
            ids += self.sp.encode(f"{ASSISTANT if i % 2 else USER}\n") + self.encode_text(f"{turn}\n")
        return ids + self.sp.encode(f"{ASSISTANT if len(turns) % 2 else USER}\n")

    def encode_text(self, text):
        """Ids of `text` in which role strings stay characters: each is split after its '<', which
        keeps sentencepiece from matching it as the role token."""
        ids = []
        for i, part in enumerate(ROLE_STRINGS.split(text)):
            ids += self.sp.encode(part) if i % 2 == 0 else self.sp.encode(part[:1]) + self.sp.encode(part[1:])
        return ids

    def encode_chat(self, turns):
        """Token ids of a rendered dialogue + <|endoftext|>, and a 0/1 mask of assistant reply tokens.

        The mask covers each reply and the newline after it, and the final <|endoftext|> when the
        assistant spoke last, so the model learns to stop. Role lines (the role token and its newline,
        which `chat_prompt` supplies) and user turns are excluded, also when a turn's text contains a
        role string. The mask is built line by line; the ids are those of the whole rendered text.
        """
        ids = self.sp.encode(render_chat(turns)) + [END_OF_TEXT_ID]
        lines, mask = [], []
        for i, turn in enumerate(turns):
            reply = i % 2 == 1
            role_line = self.sp.encode(f"{ASSISTANT if reply else USER}\n")
            text_line = self.sp.encode(f"{turn}\n")
            lines += role_line + text_line
            mask += [0] * len(role_line) + [int(reply)] * len(text_line)
        if lines + [END_OF_TEXT_ID] != ids:
            raise ValueError(
                "this tokenizer merges across the chat format's line breaks: the assistant mask "
                "cannot be aligned (train it with model.tokenizer.train_bpe)"
            )
        mask.append(int(len(turns) > 0 and len(turns) % 2 == 0))
        return ids, np.array(mask, dtype=np.uint8)
