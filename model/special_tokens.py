"""The special tokens of the chat format and of documents, as text and as ids: the one definition the
tokenizer, the export, the GGUF metadata and the task scores share (a constant here reruns no stage that
needs none of the code around it)."""

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TEXT = "<|endoftext|>"  # ends every document and dialogue; the server starts a document with it

# Fixed by the tokenizer's training settings (model/tokenizer.py); <unk> is sentencepiece's own.
UNK_ID, END_OF_TEXT_ID, USER_ID, ASSISTANT_ID = 0, 1, 2, 3
