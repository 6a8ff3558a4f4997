"""Hugging Face ``tokenizer.json`` from and to flm's byte-level BPE ``Tokenizer``.

flm's byte-level BPE (GPT-2 regex pre-tokens, merges applied by rank) is what a ``tokenizers``
``BPE`` model behind a ``ByteLevel`` pre-tokenizer computes, with the vocabulary in GPT-2's
byte-to-unicode form and the special tokens as added tokens.

Sources: ``tokenizers`` ``tokenizer.json`` format docs; Radford et al. (2019) GPT-2 for byte-level
BPE; CS336 assignment 1 handout §2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flm._io import atomic_write_bytes, atomic_write_json
from flm.tokenizer.gpt2_format import str_to_token, token_to_str
from flm.tokenizer.pretokenize import GPT2_PATTERN
from flm.tokenizer.tokenizer import EOS_TOKEN, Tokenizer

__all__ = [
    "load_hf_tokenizer",
    "save_hf_tokenizer",
    "tokenizer_json",
]

# What HF's ByteLevel pre-tokenizer splits with (use_regex=True): GPT-2's pattern, the same pre-tokens as flm's.
_HF_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def read_json(path: Path) -> Any:
    """Parse a JSON file, raising ``ValueError`` naming it when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _byte_level(**kw: Any) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True, **kw}


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """Return the ``tokenizers`` ``tokenizer.json`` dict that encodes text exactly as ``tokenizer`` does.

    A ``BPE`` model (vocabulary and merges in GPT-2 byte-to-unicode form; special tokens under
    their own text, so HF's added tokens keep flm's ids), a ``ByteLevel`` pre-tokenizer (GPT-2
    regex, no prefix space), a ``ByteLevel`` decoder, and the special tokens as added tokens
    (never split, matched longest first). A repeated merge is written once, at its
    first rank (the one flm uses; ``tokenizers`` would use the last).

    Args:
        tokenizer: an flm byte-level BPE tokenizer.

    Returns:
        A JSON-serialisable dict for ``tokenizers.Tokenizer.from_str(json.dumps(...))``.

    Raises:
        ValueError: two ids share the same bytes (the JSON vocabulary cannot hold both).

    Source: ``tokenizers`` serialisation format; GPT-2 ``encoder.py`` (byte-to-unicode); handout §2.
    """
    vocab: dict[str, int] = {}
    special_ids = {tokenizer.token_to_id(s): s for s in tokenizer.special_tokens}
    for idx in sorted(tokenizer.vocab):  # special tokens under their text, as HF matches added tokens
        key = special_ids.get(idx) or token_to_str(tokenizer.vocab[idx])
        if key in vocab:
            raise ValueError(f"tokenizer_json: ids {vocab[key]} and {idx} share the token {key!r}")
        vocab[key] = idx
    merges = [f"{token_to_str(a)} {token_to_str(b)}" for a, b in dict.fromkeys(tokenizer.merges)]  # first rank kept
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    added = sorted(({"id": tokenizer.token_to_id(s), "content": s, **flags} for s in tokenizer.special_tokens),
                   key=lambda t: t["id"])  # fmt: skip
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": merges}  # fmt: skip
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": _byte_level(), "post_processor": _byte_level(trim_offsets=False),
            "decoder": _byte_level(), "model": model}  # fmt: skip


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int | None = None) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` atomically.

    ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer.from_pretrained`` then give
    the ids of ``tokenizer.encode`` (``<|endoftext|>``, when present, is the BOS/EOS token; no
    token is added around the text). Decoding agrees too, except that HF's ``ByteLevel`` decoder
    garbles special tokens with non-ASCII text (it reads their characters as byte symbols).

    Args:
        tokenizer: an flm tokenizer.
        out_dir: the directory (created if missing).
        model_max_length: the model's context length, recorded for ``transformers``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: as :func:`tokenizer_json`.

    Source: ``tokenizers`` / ``transformers`` tokenizer file formats.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = tokenizer_json(tokenizer)
    special: dict[str, Any] = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN} if tokenizer.eos_id is not None else {}
    others = [s for s in tokenizer.special_tokens if s != EOS_TOKEN]
    if others:
        special["additional_special_tokens"] = others
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False, "add_bos_token": False,
           "add_eos_token": False, "clean_up_tokenization_spaces": False, **special}  # fmt: skip
    if model_max_length is not None:
        cfg["model_max_length"] = int(model_max_length)
    atomic_write_bytes(out / "tokenizer.json", json.dumps(spec, ensure_ascii=False).encode("utf-8"))
    atomic_write_json(out / "tokenizer_config.json", cfg)
    atomic_write_json(out / "special_tokens_map.json", special)
    return out


def _check_pre_tokenizer(pre: Any) -> None:
    """Accept GPT-2's byte-level pre-tokenization only (what flm's ``PRETOKEN_RE`` computes)."""
    steps = pre.get("pretokenizers") or [] if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    ok = len(steps) == 1 and isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    if len(steps) == 2 and all(isinstance(p, dict) for p in steps):  # Split(GPT-2 regex) then ByteLevel without regex
        split, byte_level = steps
        ok = (split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex") in (GPT2_PATTERN, _HF_GPT2_REGEX)
              and split.get("behavior") == "Isolated" and not split.get("invert", False)
              and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True))  # fmt: skip
    if not ok:
        raise ValueError(f"tokenizer.json: pre_tokenizer {json.dumps(pre)[:200]} is not GPT-2's byte-level regex split")
    if steps[-1].get("add_prefix_space", False):
        raise ValueError("tokenizer.json: ByteLevel add_prefix_space=true is not supported (flm adds no space)")


def _token_bytes(text: str) -> bytes:
    try:
        return str_to_token(text)
    except KeyError:  # added tokens some tools store raw
        return text.encode("utf-8")


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a byte-level BPE ``tokenizer.json`` (GPT-2 style) as an flm :class:`Tokenizer`.

    Added tokens become special tokens with the same ids. A repeated merge keeps its *last* rank,
    as ``tokenizers`` does. The post-processor is ignored (flm's ``encode`` adds no BOS/EOS).

    Args:
        path: a ``tokenizer.json`` file or a directory holding one.

    Returns:
        The tokenizer.

    Raises:
        ValueError: not a byte-level BPE with GPT-2 pre-tokenization (the message names the
            part: model type, normalizer, pre-tokenizer, ``add_prefix_space``, ``ignore_merges``,
            dropout, subword affixes, ``byte_fallback``, strip/single-word flags of an added
            token), a malformed merge, or an added token whose id flm would resolve differently.

    Source: ``tokenizers`` serialisation format; GPT-2 ``encoder.py`` (byte-to-unicode); handout §2.
    """
    p = Path(path)
    spec = read_json(p / "tokenizer.json" if p.is_dir() else p)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: model type {model.get('type')!r} is not supported (only byte-level 'BPE')")
    if spec.get("normalizer") is not None:
        raise ValueError(f"tokenizer.json: normalizer {json.dumps(spec['normalizer'])[:200]} is not supported")
    _check_pre_tokenizer(spec.get("pre_tokenizer"))
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges"):
        if model.get(key):
            raise ValueError(f"tokenizer.json: BPE {key}={model[key]!r} is not supported")
    vocab = {int(idx): _token_bytes(tok) for tok, idx in (model.get("vocab") or {}).items()}
    merges: dict[tuple[bytes, bytes], None] = {}
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2 or not all(isinstance(x, str) and x for x in pair):
            raise ValueError(f"tokenizer.json: merge {m!r} is not two tokens")
        try:
            key = (str_to_token(pair[0]), str_to_token(pair[1]))
        except KeyError as e:
            raise ValueError(f"tokenizer.json: merge {m!r} has a character outside the byte-to-unicode table") from e
        merges.pop(key, None)  # the last occurrence sets the rank
        merges[key] = None
    added = spec.get("added_tokens") or []
    for t in added:
        flags = [k for k in ("single_word", "lstrip", "rstrip") if t.get(k)]
        if flags:
            raise ValueError(f"tokenizer.json: added token {t.get('content')!r} has {flags} set (not supported)")
        vocab[int(t["id"])] = t["content"].encode("utf-8")  # the id means the added token's text
    tok = Tokenizer(vocab, list(merges), [t["content"] for t in added])
    for t in added:
        if tok.token_to_id(t["content"]) != int(t["id"]):
            raise ValueError(f"tokenizer.json: added token {t['content']!r} has id {t['id']}, but flm would use id "
                             f"{tok.token_to_id(t['content'])} (the same bytes)")  # fmt: skip
    return tok
