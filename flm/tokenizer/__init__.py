"""Byte-level BPE tokenizer: training, encoding/decoding, GPT-2 file format, corpus encoding (handout §2).

Public names:
    train_bpe: learn ``(vocab, merges)`` from a text file.
    Tokenizer: encode/decode with a vocabulary and merges; load/save GPT-2 format files.
    encode_file: a whole text file to a flat uint16/uint32 token file plus a JSON sidecar.
"""

from flm.tokenizer.bpe import train_bpe, train_bpe_from_counts
from flm.tokenizer.encode_file import encode_file, token_dtype
from flm.tokenizer.pretokenize import GPT2_PATTERN, count_pretokens
from flm.tokenizer.tokenizer import EOS_TOKEN, Tokenizer

__all__ = [
    "train_bpe",
    "train_bpe_from_counts",
    "Tokenizer",
    "encode_file",
    "token_dtype",
    "GPT2_PATTERN",
    "count_pretokens",
    "EOS_TOKEN",
]
