"""Training data: text / JSONL -> a flat token file, and a deterministic window loader over it.

Token file format: a raw little-endian array of token ids (``uint16`` when the vocabulary fits, else ``uint32``)
with a JSON sidecar ``<file>.json`` recording the dtype, token and document counts, the separator id and the
sources. Documents are concatenated with the EOS id *between* them (``doc0 EOS doc1 EOS doc2``). A raw ``.bin``
without a sidecar (nanoGPT's format) is read as ``uint16``.

A document is a whole ``.txt`` / ``.md`` file, or one line of a ``.jsonl`` file (its ``text_field``).

The loader draws fixed-length windows ``[batch, seq_len + 1]`` (inputs are ``[:, :-1]``, labels ``[:, 1:]``).
Batch ``step`` is a pure function of ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted
run would have seen; the "data position" saved in a checkpoint is just the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..atomic import atomic_write_path

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TOKEN_SUFFIXES = (".bin", ".tokens")
_CHUNK_CHARS = 1 << 20  # tokenise long texts in ~1 MiB pieces cut at exact token boundaries


class DataError(ValueError):
    """Unusable training or evaluation data (empty, too short, malformed); the message names the file."""


# ------------------------------------------------------------------------------------------------- tokenising
def _safe_cuts(text: str, every: int) -> Iterator[str]:
    """Split ``text`` into pieces of about ``every`` characters whose separate BPE encodings concatenate to the
    encoding of the whole.

    A piece ends at a lone ``\\n`` between two non-whitespace characters (``x\\n|y``): GPT-2's pre-tokeniser never
    joins a newline with a following non-space character (only a literal space prefixes words/punctuation), and
    the one-character whitespace run ``\\n`` is its own pre-token on both sides of the cut. (After a longer run such
    as ``\\n\\n`` a cut is *not* safe: ``\\s+(?!\\S)`` leaves the run's last character to the next pre-token.)
    """
    start = 0
    while len(text) - start > every:
        cut = max(start + every, start + 2)
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()
                                       and not text[cut - 2].isspace()):
            cut += 1
        if cut >= len(text):
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _iter_documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """Yield ``(document text, bytes consumed)`` from a text or JSONL file."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    yield "", len(raw)
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{path}:{line_no}: no {text_field!r} field in this JSON line")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_no}: field {text_field!r} is {type(text).__name__}, not a string")
                yield text, len(raw)
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        yield text, path.stat().st_size


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (GPT-2's 50257 does), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_files(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer=None,
    text_field: str = "text",
    eos_id: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenise text / JSONL files into one token file (written atomically) plus its ``.json`` sidecar.

    Args:
        inputs: ``.txt``/``.md`` files (one document each) and ``.jsonl`` files (one document per line, taken
            from ``text_field``); empty documents are skipped.
        output: the token file to write (``<output>.json`` gets the metadata).
        tokenizer: anything with ``encode(text) -> list[int]``, ``eos_token_id`` and ``vocab_size``; the bundled
            GPT-2 BPE when None.
        text_field: the JSONL field holding the text.
        eos_id: separator between documents (default: the tokenizer's EOS, 50256 for GPT-2).
        progress: show a tqdm bar over input bytes.

    Returns:
        The metadata written to the sidecar (``n_tokens``, ``n_documents``, ``dtype``, ...).

    Raises:
        DataError: a file is missing, not UTF-8, malformed JSONL, or everything is empty.
    """
    from tqdm.auto import tqdm

    if tokenizer is None:
        from ..tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer()
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files given")
    for p in paths:
        if not p.is_file():
            raise DataError(_not_a_file(p, "data file"))
    eos = tokenizer.eos_token_id if eos_id is None else int(eos_id)
    dtype = token_dtype(max(int(tokenizer.vocab_size), eos + 1))
    output = Path(output)
    n_tokens = n_docs = 0
    total_bytes = sum(p.stat().st_size for p in paths)
    with atomic_write_path(output) as tmp, open(tmp, "wb") as out, tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not progress
    ) as bar:
        for path in paths:
            for text, consumed in _iter_documents(path, text_field):
                if text:
                    ids = [] if n_docs == 0 else [eos]
                    for piece in _safe_cuts(text, _CHUNK_CHARS):
                        ids.extend(tokenizer.encode(piece))
                    array = np.asarray(ids, dtype=dtype)
                    out.write(array.tobytes())
                    n_tokens += len(array)
                    n_docs += 1
                bar.update(consumed)
    if n_tokens == 0:
        output.unlink(missing_ok=True)
        raise DataError(f"no text found in {', '.join(os.fspath(p) for p in paths)}")
    meta = {
        "format": "gpt2-jax tokens v1",
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_documents": n_docs,
        "eos_id": eos,
        "vocab_size": int(tokenizer.vocab_size),
        "sources": [os.fspath(p) for p in paths],
    }
    with atomic_write_path(_sidecar(output)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _not_a_file(path: Path, what: str) -> str:
    """Why ``path`` cannot be read as a data file: missing, or a directory (then: name the files in it)."""
    if path.is_dir():
        return (f"{what} {os.fspath(path)!r} is a directory; give the files in it instead, e.g. "
                f"--data {os.fspath(path / '*.txt')}")
    if path.exists():
        return f"{what} {os.fspath(path)!r} is not a regular file"
    return f"{what} {os.fspath(path)!r} does not exist"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token file (read-only); the dtype comes from its sidecar, ``uint16`` without one.

    Raises:
        DataError: missing, empty, or a size that is not a whole number of tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(_not_a_file(path, "token file"))
    dtype = np.dtype(np.uint16)
    if _sidecar(path).is_file():
        try:
            dtype = np.dtype(json.loads(_sidecar(path).read_text(encoding="utf-8"))["dtype"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{_sidecar(path)} is not a valid token-file sidecar: {e}") from None
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file {os.fspath(path)!r} is empty")
    if size % dtype.itemsize:
        raise DataError(f"token file {os.fspath(path)!r} has {size} bytes, not a multiple of {dtype.name}")
    return np.memmap(path, dtype=dtype, mode="r")


def load_or_tokenize(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike | None = None,
    tokenizer=None,
    text_field: str = "text",
    progress: bool = True,
) -> np.ndarray:
    """Tokens of ``data``: a token file (``.bin``/``.tokens``) is memory-mapped; text / JSONL files are tokenised
    into ``cache_dir`` (reused while the sources' sizes and mtimes are unchanged)."""
    paths = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(p) for p in data]
    if len(paths) == 1 and paths[0].suffix.lower() in TOKEN_SUFFIXES:
        return load_tokens(paths[0])
    for p in paths:
        if not p.is_file():
            raise DataError(_not_a_file(p, "data file"))
        if p.suffix.lower() in TOKEN_SUFFIXES:
            raise DataError(f"{os.fspath(p)!r}: a token file cannot be mixed with other inputs")
    stamp = [[os.fspath(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    if cache_dir is None:
        import tempfile

        # A private scratch directory in the shared temporary directory: 0700 on purpose (not an artefact).
        cache_dir = tempfile.mkdtemp(prefix="gpt2-jax-tokens-")
    out = Path(cache_dir) / (paths[0].stem + ".bin")
    stamp_file = out.with_name(out.name + ".sources")
    if out.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return load_tokens(out)
    tokenize_files(paths, out, tokenizer, text_field, progress=progress)
    with atomic_write_path(stamp_file) as tmp:
        tmp.write_text(json.dumps(stamp), encoding="utf-8")
    return load_tokens(out)


# ---------------------------------------------------------------------------------------------------- loading
def _words(seed) -> list[int]:
    """A seed (int, or a ``jax.random`` key / its uint32 data) as a list of non-negative ints for SeedSequence."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) & 0xFFFFFFFFFFFFFFFF]
    import jax

    data = seed
    if hasattr(seed, "dtype") and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(seed)
    return [int(w) for w in np.asarray(data, dtype=np.uint32).ravel()]


@dataclasses.dataclass(frozen=True, eq=False)
class WindowLoader:
    """Fixed-length training windows drawn from a token array, deterministically from ``(seed, step)``.

    Args:
        tokens: 1-D token array (e.g. :func:`load_tokens`).
        batch_size: global rows per step.
        seq_len: tokens per input row; a window holds ``seq_len + 1`` tokens (inputs + shifted labels).
        seed: an int or a ``jax.random`` key.
        shuffle: ``"random"``: each row starts at a uniformly drawn offset (nanoGPT's sampler; windows may
            overlap); ``"epoch"``: the ``(n - 1) // seq_len`` non-overlapping windows are visited in a fresh
            random order every epoch, so each token is trained on once per epoch.
    """

    tokens: np.ndarray
    batch_size: int
    seq_len: int
    seed: object = 0
    shuffle: str = "random"

    def __post_init__(self):
        if self.shuffle not in ("random", "epoch"):
            raise ValueError(f"shuffle must be 'random' or 'epoch', got {self.shuffle!r}")
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {self.batch_size} and {self.seq_len}")
        n = len(self.tokens)
        if n < self.seq_len + 1:
            raise DataError(
                f"the data holds {n} tokens; one training window needs seq_len + 1 = {self.seq_len + 1}"
                + (" (the data is empty)" if n == 0 else "; use more text or a shorter --seq-len")
            )
        object.__setattr__(self, "_seed_words", _words(self.seed))
        object.__setattr__(self, "_order", (None, None))  # (epoch, permutation) of the last epoch used

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows per epoch (``"epoch"`` mode) / distinct start offsets (``"random"``)."""
        n = len(self.tokens)
        return (n - 1) // self.seq_len if self.shuffle == "epoch" else n - self.seq_len

    def _rng(self, *counter: int) -> np.random.Generator:
        return np.random.Generator(np.random.Philox(np.random.SeedSequence([*self._seed_words, *counter])))

    def starts(self, step: int) -> np.ndarray:
        """Start offsets ``[batch_size]`` of batch ``step`` (int64)."""
        if self.shuffle == "random":
            return self._rng(0, step).integers(0, self.num_windows, size=self.batch_size, dtype=np.int64)
        first = step * self.batch_size
        samples = np.arange(first, first + self.batch_size, dtype=np.int64)
        epochs, slots = np.divmod(samples, self.num_windows)
        starts = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            starts[epochs == epoch] = self._permutation(int(epoch))[slots[epochs == epoch]] * self.seq_len
        return starts

    def _permutation(self, epoch: int) -> np.ndarray:
        """Visiting order of the windows in ``epoch`` (the last one is cached: consecutive steps share it)."""
        cached_epoch, order = self._order
        if cached_epoch != epoch:
            order = self._rng(1, epoch).permutation(self.num_windows)
            object.__setattr__(self, "_order", (epoch, order))
        return order

    def batch(self, step: int, process_index: int = 0, process_count: int = 1,
              rows: tuple[int, int] | None = None) -> np.ndarray:
        """Batch ``step`` as int32 ``[batch_size / process_count, seq_len + 1]``: this process's contiguous rows
        of the global batch (all of it on one host); ``rows=(start, stop)`` takes exactly those rows instead
        (``[stop - start, seq_len + 1]``, e.g. :func:`~gpt2_jax.training.sharding.local_batch_rows`)."""
        if rows is None:
            if self.batch_size % process_count:
                raise ValueError(f"batch size {self.batch_size} is not divisible by {process_count} processes")
            per_process = self.batch_size // process_count
            rows = (process_index * per_process, (process_index + 1) * per_process)
        start, stop = rows
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {rows} are not a non-empty range within the batch of {self.batch_size}")
        starts = self.starts(step)[start:stop]
        offsets = starts[:, None] + np.arange(self.seq_len + 1)[None, :]  # [rows, seq_len + 1]
        return np.asarray(self.tokens[offsets], dtype=np.int32)

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after ``step`` steps (samples seen / windows per epoch)."""
        return step * self.batch_size / self.num_windows

    def __iter__(self) -> Iterator[np.ndarray]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def iter_eval_windows(tokens: np.ndarray, seq_len: int, stride: int | None = None) -> Iterable[tuple[int, int, int]]:
    """Hugging Face's sliding windows over a long text: ``(begin, end, n_new)`` with ``end - begin <= seq_len``;
    window ``k`` scores only its ``n_new`` last tokens, the ones no earlier window scored.

    Follows https://huggingface.co/docs/transformers/perplexity: ``begin`` steps by ``stride`` (default
    ``seq_len``: disjoint windows), ``end = min(begin + seq_len, n)``, ``n_new = end - previous end``.
    """
    n = len(tokens)
    stride = seq_len if stride is None else int(stride)
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if n < 2:
        raise DataError(f"evaluation needs at least 2 tokens, the data holds {n}")
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        yield begin, end, end - prev_end
        prev_end = end
        if end == n:
            break
