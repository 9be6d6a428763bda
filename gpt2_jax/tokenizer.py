"""GPT-2 byte-level BPE tokenizer on tiktoken, fully offline.

The BPE ranks of the released GPT-2 tokenizer ship with the package
(``gpt2_jax/assets/gpt2.tiktoken``), so nothing is ever downloaded. Ranks can
also be loaded from a Hugging Face tokenizer directory (``vocab.json`` +
``merges.txt``) or an OpenAI checkpoint directory (``encoder.json`` +
``vocab.bpe``), and written back in Hugging Face form with
:meth:`GPT2Tokenizer.save_pretrained`.

Example::

    tok = GPT2Tokenizer()
    ids = tok.encode("Agney loves to train DL models")
    tok.decode(ids)                       # 'Agney loves to train DL models'
    tok.tokenize("Agney loves")           # ['Ag', 'ney', 'Ġloves']
    batch = tok(["a b", "c"], padding=True, padding_side="left", return_tensors="np")
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import importlib.resources
import json
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from .atomic import atomic_write_path

__all__ = [
    "GPT2_PATTERN",
    "EOT_TOKEN",
    "BatchEncoding",
    "GPT2Tokenizer",
    "StreamingDecoder",
    "bytes_to_unicode",
    "bundled_ranks",
    "load_tiktoken_ranks",
    "ranks_to_merges",
]

#: GPT-2's pre-tokenisation pattern (from OpenAI's ``encoder.py``).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: The one special token of GPT-2: beginning, end, unknown and (by default) padding.
EOT_TOKEN = "<|endoftext|>"

_ASSET = "gpt2.tiktoken"
_ASSET_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_MERGES_HEADER = "#version: 0.2"


# --------------------------------------------------------------------------- byte-level table


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (256 entries).

    Printable Latin-1 bytes map to themselves; the others (control characters,
    space, ...) map to code points from 256 upwards, so that ``b" "`` is ``'Ġ'``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _bytes_to_token_str(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def _token_str_to_bytes(token: str) -> bytes | None:
    """Inverse of :func:`_bytes_to_token_str`; None if ``token`` has a character outside the table."""
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[c] for c in token)
    except KeyError:
        return None


# --------------------------------------------------------------------------- rank files


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file (one ``base64(token_bytes) rank`` line per token).

    Raises:
        FileNotFoundError / PermissionError: the file cannot be read (message names it).
        ValueError: a malformed line, duplicate token or rank, or an empty file.
    """
    path = Path(path)
    return _parse_tiktoken(_read_bytes(path, "BPE ranks file"), str(path))


def _parse_tiktoken(data: bytes, where: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 2 fields, got {len(fields)}")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{where}:{lineno}: corrupt line {line[:60]!r} ({e})") from None
        if token in ranks:
            raise ValueError(f"{where}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{where}: no BPE ranks found (empty file)")
    _check_ranks(ranks, where)
    return ranks


def _check_ranks(ranks: Mapping[bytes, int], where: str) -> None:
    """Ranks must be exactly 0..n-1 and include every single byte (tiktoken needs both)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: token ranks/ids must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: the vocabulary lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]})")


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{what} is a directory, expected a file: {path}") from None
    except OSError as e:
        raise OSError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _read_text(path: Path, what: str) -> str:
    data = _read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e})") from None


def _asset_bytes() -> bytes:
    """The raw bytes of the bundled ``gpt2.tiktoken``."""
    return importlib.resources.files("gpt2_jax").joinpath("assets", _ASSET).read_bytes()


@functools.cache
def _bundled_ranks() -> types.MappingProxyType:
    try:
        data = _asset_bytes()
    except OSError as e:
        raise RuntimeError(f"the bundled GPT-2 BPE ranks (gpt2_jax/assets/{_ASSET}) cannot be read: {e}; "
                           "reinstall gpt2-jax") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != _ASSET_SHA256:
        raise RuntimeError(f"the bundled GPT-2 BPE ranks (gpt2_jax/assets/{_ASSET}) are corrupted: "
                           f"sha256 {digest}, expected {_ASSET_SHA256}; reinstall gpt2-jax")
    return types.MappingProxyType(_parse_tiktoken(data, f"gpt2_jax/assets/{_ASSET}"))


def bundled_ranks() -> Mapping[bytes, int]:
    """The GPT-2 BPE ranks shipped with the package (read-only, sha256-checked, cached)."""
    return _bundled_ranks()


# --------------------------------------------------------------------------- HF / OpenAI files


def _load_vocab_json(path: Path) -> dict[str, int]:
    text = _read_text(path, "vocab file")
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"vocab file {path} is not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"vocab file {path} must hold a non-empty JSON object of token -> id")
    for token, idx in vocab.items():
        if type(idx) is not int or idx < 0:
            raise ValueError(f"vocab file {path}: token {token!r} has id {idx!r}, expected a non-negative int")
    return vocab


def _load_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for lineno, line in enumerate(_read_text(path, "merges file").splitlines(), 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"merges file {path}:{lineno}: expected two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _hf_to_ranks(vocab_path: Path, merges_path: Path) -> dict[bytes, int]:
    """Convert ``vocab.json`` + ``merges.txt`` to tiktoken ranks (the rank of a token is its id)."""
    vocab = _load_vocab_json(vocab_path)
    eot_id = vocab.pop(EOT_TOKEN, None)
    ranks: dict[bytes, int] = {}
    for token, idx in vocab.items():
        data = _token_str_to_bytes(token)
        if data is None:
            raise ValueError(f"vocab file {vocab_path}: token {token!r} is not a GPT-2 byte-level token string")
        if data in ranks:
            raise ValueError(f"vocab file {vocab_path}: token {token!r} appears twice")
        ranks[data] = idx
    _check_ranks(ranks, str(vocab_path))
    if eot_id not in (None, len(ranks)):
        raise ValueError(f"vocab file {vocab_path}: {EOT_TOKEN} has id {eot_id}, expected {len(ranks)} "
                         "(right after the other tokens)")
    # tiktoken merges the pair whose result has the lowest rank; that equals HF BPE (lowest merge
    # index) when every merge yields a known token and merged ranks rise with the merge index.
    merges = _load_merges(merges_path)
    if len(merges) != len(ranks) - 256:
        raise ValueError(f"merges file {merges_path} has {len(merges)} merges but {vocab_path} has "
                         f"{len(ranks) - 256} multi-byte tokens; they must match")
    last = -1
    for lineno, (left, right) in enumerate(merges, 1):
        known = left in vocab and right in vocab
        rank = ranks.get(_token_str_to_bytes(left) + _token_str_to_bytes(right)) if known else None
        if rank is None:
            raise ValueError(f"merges file {merges_path}: merge {lineno} ({left!r} {right!r}) "
                             f"does not produce a token of {vocab_path}")
        if rank <= last:
            raise ValueError(f"merges file {merges_path}: merge {lineno} ({left!r} {right!r}) is out of order "
                             f"with the ids of {vocab_path}; such a vocabulary cannot be expressed as ranks")
        last = rank
    return ranks


def _bpe_parts(token: bytes, ranks: Mapping[bytes, int], below: int) -> list[bytes]:
    """Byte-pair encode ``token`` using only ranks below ``below`` (plain Python, for deriving merges)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def ranks_to_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Derive the BPE merge list from ranks, in rank order.

    The merge of rank ``r`` is the last merge BPE performs on token ``r`` using only
    ranks below ``r``. Raises ValueError if some multi-byte token is unreachable.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built by merging two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _vocab_and_merges_text(ranks: Mapping[bytes, int], vocab: Mapping[str, int]) -> tuple[str, str]:
    """Hugging Face ``vocab.json`` and ``merges.txt`` text for BPE ``ranks`` with token->id ``vocab``."""
    merges = ranks_to_merges(ranks)
    vocab_text = json.dumps(dict(vocab), ensure_ascii=False, indent=2) + "\n"
    merges_text = "\n".join([_MERGES_HEADER, *(f"{_bytes_to_token_str(a)} {_bytes_to_token_str(b)}"
                                               for a, b in merges)]) + "\n"
    return vocab_text, merges_text


@functools.cache
def _bundled_vocab_and_merges_text() -> tuple[str, str]:
    return _vocab_and_merges_text(bundled_ranks(), GPT2Tokenizer().get_vocab())


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`gpt2_jax.atomic.atomic_write_path`: a temporary file beside
    it, fsynced, given the mode ``0o666 & ~umask`` and renamed into place)."""
    with atomic_write_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


# --------------------------------------------------------------------------- batch output


class BatchEncoding(dict):
    """The dict returned by :meth:`GPT2Tokenizer.__call__`; keys are also attributes (``enc.input_ids``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# --------------------------------------------------------------------------- tokenizer


class GPT2Tokenizer:
    """GPT-2 byte-level BPE backed by ``tiktoken.Encoding``; never touches the network.

    ``<|endoftext|>`` (id 50256 for GPT-2) is the bos, eos, unk and default pad token.
    Special-token *text* inside user input (e.g. the literal ``"<|endoftext|>"``) is
    encoded as plain text by default; pass ``allowed_special="all"`` or
    ``{"<|endoftext|>"}`` to map it to the special id.

    Args:
        mergeable_ranks: token bytes -> rank (ids 0..n-1); the bundled GPT-2 ranks if None.
            ``<|endoftext|>`` gets id n.
        add_prefix_space: prepend a space to text that does not start with one (like the
            Hugging Face flag), so the first word is tokenized like any other word. Only the
            start of the text gets it (HF also adds one after each allowed special token).
            ``decode`` does not strip it.
        padding_side: default side for padding in ``__call__``: "right" or "left".
        model_max_length: length used by ``truncation=True`` / ``padding="max_length"``
            when ``max_length`` is not given.
    """

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int] | None = None,
        *,
        add_prefix_space: bool = False,
        padding_side: str = "right",
        model_max_length: int = 1024,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if mergeable_ranks is None:
            mergeable_ranks = bundled_ranks()
        else:
            _check_ranks(mergeable_ranks, "mergeable_ranks")
        self._ranks = mergeable_ranks
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=dict(mergeable_ranks),
            special_tokens={EOT_TOKEN: len(mergeable_ranks)},
        )
        self.add_prefix_space = bool(add_prefix_space)
        self.padding_side = padding_side
        self.model_max_length = int(model_max_length)
        self.bos_token = self.eos_token = self.unk_token = self.pad_token = EOT_TOKEN
        self.bos_token_id = self.eos_token_id = self.unk_token_id = self.pad_token_id = len(mergeable_ranks)

    # ---- constructors and saving

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike, **kwargs: Any) -> GPT2Tokenizer:
        """Build from a tiktoken ranks file (``base64(token) rank`` per line)."""
        return cls(load_tiktoken_ranks(path), **kwargs)

    @classmethod
    def from_hf_files(
        cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, **kwargs: Any
    ) -> GPT2Tokenizer:
        """Build from Hugging Face ``vocab.json`` + ``merges.txt`` (or OpenAI ``encoder.json`` + ``vocab.bpe``)."""
        return cls(_hf_to_ranks(Path(vocab_json), Path(merges_txt)), **kwargs)

    @classmethod
    def from_directory(cls, path: str | os.PathLike, **kwargs: Any) -> GPT2Tokenizer:
        """Build from a Hugging Face tokenizer directory or an OpenAI GPT-2 checkpoint directory.

        Looks for ``vocab.json`` + ``merges.txt``, then ``encoder.json`` + ``vocab.bpe``.
        ``add_prefix_space`` and ``model_max_length`` are read from ``tokenizer_config.json``
        when present; keyword arguments override them.
        """
        path = Path(path)
        if not path.is_dir():
            raise NotADirectoryError(f"tokenizer directory not found: {path}")
        config_path = path / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(_read_text(config_path, "tokenizer config"))
            except json.JSONDecodeError as e:
                raise ValueError(f"tokenizer config {config_path} is not valid JSON ({e})") from None
            for key in ("add_prefix_space", "model_max_length"):
                if isinstance(config, dict) and isinstance(config.get(key), (bool, int)):
                    kwargs.setdefault(key, config[key])
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab).exists() or (path / merges).exists():
                return cls.from_hf_files(path / vocab, path / merges, **kwargs)
        raise FileNotFoundError(f"{path} holds neither vocab.json + merges.txt nor encoder.json + vocab.bpe")

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        The files are in Hugging Face form (loadable by ``transformers.AutoTokenizer``
        and :meth:`from_directory`); each is written atomically. Returns the paths written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_text, merges_text = self._hf_vocab_and_merges_text
        special = {f"{k}_token": EOT_TOKEN for k in ("bos", "eos", "unk", "pad")}
        config = {
            "add_bos_token": False,
            "add_prefix_space": self.add_prefix_space,
            "added_tokens_decoder": {
                str(self.eos_token_id): {"content": EOT_TOKEN, "lstrip": False, "normalized": True,
                                         "rstrip": False, "single_word": False, "special": True}
            },
            **special,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "tokenizer_class": "GPT2Tokenizer",
        }
        files = {
            "vocab.json": vocab_text,
            "merges.txt": merges_text,
            "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        }
        for name, text in files.items():
            _atomic_write_text(directory / name, text)
        return [directory / name for name in files]

    @functools.cached_property
    def _hf_vocab_and_merges_text(self) -> tuple[str, str]:
        """The text of ``vocab.json`` and ``merges.txt`` (they depend on the ranks only; the bundled ranks' are
        rendered once per process, as deriving the merges takes a few seconds)."""
        if self._ranks is bundled_ranks():
            return _bundled_vocab_and_merges_text()
        return _vocab_and_merges_text(self._ranks, self.get_vocab())

    # ---- vocabulary

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying ``tiktoken.Encoding``."""
        return self._encoding

    @property
    def mergeable_ranks(self) -> Mapping[bytes, int]:
        """Token bytes -> rank (= id), special tokens excluded. Do not mutate."""
        return self._ranks

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (50257 for GPT-2)."""
        return self._encoding.n_vocab

    def __len__(self) -> int:
        """Same as :attr:`vocab_size`."""
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special tokens."""
        return [self.eos_token_id]

    @functools.cached_property
    def _id_to_token(self) -> list[str]:
        tokens = [""] * self.vocab_size
        for data, rank in self._ranks.items():
            tokens[rank] = _bytes_to_token_str(data)
        tokens[self.eos_token_id] = EOT_TOKEN
        return tokens

    @functools.cached_property
    def _token_to_id(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self._id_to_token)}

    def get_vocab(self) -> dict[str, int]:
        """Byte-level token string -> id, special tokens included (a fresh dict)."""
        return dict(self._token_to_id)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Id(s) -> byte-level token string(s) such as ``'Ġloves'``."""
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token[self._check_ids([ids])[0]]
        return [self._id_to_token[i] for i in self._check_ids(ids)]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Byte-level token string(s) -> id(s); unknown tokens give :attr:`unk_token_id`."""
        if isinstance(tokens, str):
            return self._token_to_id.get(tokens, self.unk_token_id)
        return [self._token_to_id.get(t, self.unk_token_id) for t in tokens]

    def convert_tokens_to_string(self, tokens: Iterable[str], errors: str = "replace") -> str:
        """Join byte-level token strings back into text (invalid UTF-8 handled per ``errors``)."""
        text = "".join(tokens)
        data = _token_str_to_bytes(text)
        if data is None:
            raise ValueError("tokens contain characters that are not GPT-2 byte-level characters")
        return _utf8(data, errors)

    # ---- encoding

    def _prepare(self, text: Any) -> str:
        if not isinstance(text, str):
            raise TypeError(f"expected text as a str, got {type(text).__name__}")
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        return text

    def encode(self, text: str, allowed_special: str | Iterable[str] = ()) -> list[int]:
        """Text -> ids.

        Special-token text such as ``"<|endoftext|>"`` is encoded as ordinary text unless
        listed in ``allowed_special`` (a set of token strings, or ``"all"``), in which case
        it maps to its special id.
        """
        text = self._prepare(text)
        if not allowed_special:
            return self._encoding.encode_ordinary(text)
        if allowed_special != "all":
            allowed_special = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
            unknown = allowed_special - self._encoding.special_tokens_set
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}; known: {[EOT_TOKEN]}")
        return self._encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], allowed_special: str | Iterable[str] = ()) -> list[list[int]]:
        """Encode each text of ``texts`` (single-threaded); see :meth:`encode`."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"encode_batch() expects a list of str, got {type(texts).__name__}")
        return [self.encode(t, allowed_special) for t in texts]

    def tokenize(self, text: str, allowed_special: str | Iterable[str] = ()) -> list[str]:
        """Text -> byte-level token strings, e.g. ``['Ag', 'ney', 'Ġloves']``."""
        return [self._id_to_token[i] for i in self.encode(text, allowed_special)]

    # ---- decoding

    def _check_ids(self, ids: Any) -> list[int]:
        """Validate ids (ints, sequences, numpy / jax arrays) and return them as a list of int."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"expected token ids, got {type(ids).__name__}")
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            ids = [ids]
        arr = np.asarray(ids)
        if arr.dtype == object and arr.ndim == 1:  # e.g. Python ints beyond int64
            ids = arr.tolist()
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise TypeError("token ids must be integers")
        elif arr.size == 0:
            return []
        elif arr.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
        elif not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        else:
            ids = arr.tolist()
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.vocab_size} "
                             f"(valid ids are 0..{self.vocab_size - 1})")
        return ids

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Ids -> the raw bytes they stand for."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self._encoding.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids (list, numpy or jax array, or one int) -> text.

        With ``errors="replace"`` (default) bytes that are not valid UTF-8, e.g. a sequence
        ending mid-character, become U+FFFD; ``errors="strict"`` raises UnicodeDecodeError.

        Raises:
            ValueError: an id is negative or not below :attr:`vocab_size`.
        """
        return _utf8(self.decode_bytes(ids, skip_special_tokens), errors)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False,
                     errors: str = "replace") -> list[str]:
        """Decode each sequence of ``sequences`` (e.g. the rows of a 2-D array)."""
        return [self.decode(s, skip_special_tokens, errors) for s in sequences]

    # ---- batch call

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        padding: bool | str = False,
        padding_side: str | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_length: bool = False,
        allowed_special: str | Iterable[str] = (),
    ) -> BatchEncoding:
        """Encode a text or a batch of texts into ``input_ids`` and ``attention_mask``.

        Args:
            texts: one string (unbatched lists are returned unless ``return_tensors`` is
                set) or a sequence of strings.
            padding: False / "do_not_pad"; True / "longest" (pad to the longest row);
                "max_length" (pad to ``max_length``, else ``model_max_length``).
            padding_side: "right" or "left"; defaults to :attr:`padding_side`.
            truncation: cut rows to ``max_length`` (else ``model_max_length``), keeping the start.
            max_length: see ``padding`` and ``truncation``.
            return_tensors: None (lists), "np" (int64 arrays) or "jax" (int32 arrays).
            return_length: add ``length``, the number of real (unpadded) tokens per row.
            allowed_special: see :meth:`encode`.
        """
        single = isinstance(texts, str)
        if single:
            texts = [texts]
        elif not isinstance(texts, Sequence):
            raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if not isinstance(truncation, bool):
            raise ValueError(f"truncation must be True or False, got {truncation!r}")
        if return_tensors not in (None, "np", "jax"):
            raise ValueError(f"return_tensors must be None, 'np' or 'jax', got {return_tensors!r}")
        limit = self.model_max_length if max_length is None else int(max_length)
        if limit < 0:
            raise ValueError(f"max_length must be non-negative, got {max_length}")

        rows = self.encode_batch(texts, allowed_special)
        if truncation:
            rows = [r[:limit] for r in rows]
        lengths = [len(r) for r in rows]
        width = None
        if padding == "max_length":
            width = limit
        elif padding in (True, "longest"):
            width = max(lengths, default=0)
        masks = [[1] * n for n in lengths]
        if width is not None:
            for r, m in zip(rows, masks):
                pad = max(width - len(r), 0)
                if side == "right":
                    r.extend([self.pad_token_id] * pad)
                    m.extend([0] * pad)
                else:
                    r[:0] = [self.pad_token_id] * pad
                    m[:0] = [0] * pad

        out = BatchEncoding(input_ids=rows, attention_mask=masks)
        if return_length:
            out["length"] = lengths
        if return_tensors is None:
            if single:
                out = BatchEncoding({k: v[0] for k, v in out.items()})
            return out
        if len(set(map(len, rows))) > 1:
            raise ValueError("rows have different lengths; pass padding=True (or truncation with "
                             f"padding='max_length') to return {return_tensors!r} tensors")
        return _to_tensors(out, return_tensors)

    def __repr__(self) -> str:
        return (f"GPT2Tokenizer(vocab_size={self.vocab_size}, add_prefix_space={self.add_prefix_space}, "
                f"padding_side={self.padding_side!r}, model_max_length={self.model_max_length})")


def _to_tensors(out: BatchEncoding, kind: str) -> BatchEncoding:
    """Lists of equal-length rows -> int64 numpy arrays ("np") or int32 jax arrays ("jax")."""
    n = len(out["input_ids"])
    width = len(out["input_ids"][0]) if n else 0
    dtype = np.int64 if kind == "np" else np.int32
    arrays = {k: np.asarray(v, dtype).reshape((n,) if k == "length" else (n, width)) for k, v in out.items()}
    if kind == "jax":
        import jax.numpy as jnp  # imported lazily: plain tokenization needs no jax

        arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    return BatchEncoding(arrays)


def _utf8(data: bytes, errors: str) -> str:
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError(
            "utf-8", data, e.start, e.end,
            f"{e.reason}: the token ids decode to bytes that are not valid UTF-8 (e.g. the sequence "
            "ends mid-character); use errors='replace' or StreamingDecoder") from None


class StreamingDecoder:
    """Incremental decoding: feed ids one at a time, get text as soon as it is complete.

    A UTF-8 character split over several tokens is held back until its last byte
    arrives, so the printed text never shows a broken character. The concatenation
    of every ``push`` and the final ``flush`` equals ``tokenizer.decode(all_ids)``.

    Example::

        stream = StreamingDecoder(tok)
        for i in ids:
            print(stream.push(i), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: GPT2Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text completed by it (possibly "")."""
        return self._decoder.decode(self.tokenizer.decode_bytes([token_id], self.skip_special_tokens))

    def flush(self) -> str:
        """End the stream: return the pending text (an incomplete character becomes U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
