"""The byte-level tokenizer of the zoo's KV-cache decoders: one token per UTF-8 byte.

A byte-level BPE (GPT-2's ByteLevel pre-tokenizer and decoder) whose vocabulary is the 256
ByteLevel alphabet symbols, with no merges, plus ``<|endoftext|>``. Symbol ids follow the byte
they stand for, so token id b is byte b and any UTF-8 text round-trips exactly. The file is
Hugging Face's ``tokenizer.json``, which ``transformers``, ONNX Runtime GenAI and the
``tokenizers`` library load as is.

>>> byte_level_tokenizer().encode("hé").ids
[104, 195, 169]
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 256
VOCAB_SIZE = EOS_TOKEN_ID + 1
"""The 256 byte tokens and ``<|endoftext|>``: the zoo decoders' vocab_size."""


def byte_symbols() -> list[str]:
    """The ByteLevel alphabet symbol of each byte 0..255 (GPT-2's ``bytes_to_unicode``).

    Printable Latin-1 bytes stand for themselves; the other 68 take the code points from 256 up,
    in byte order, so that no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in symbols):
        symbols[byte] = chr(256 + offset)
    return [symbols[byte] for byte in range(256)]


def byte_level_tokenizer() -> Tokenizer:
    """The tokenizer: ids 0..255 are bytes, :data:`EOS_TOKEN_ID` is ``<|endoftext|>``."""
    vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tokenizer


def tokenizer_json() -> str:
    """The tokenizer as ``tokenizer.json`` text, identical on every run and in every process
    (the library writes the vocabulary in id order)."""
    return byte_level_tokenizer().to_str(pretty=True) + "\n"
