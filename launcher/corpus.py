"""Text corpora of many files: Parquet (a `text` column) or ArrayRecord (UTF-8 records) shards,
local or `gs://`, read by random access and packed into windows of tokens.

A corpus is its records in file order (files sorted by name). The split's records, each followed
by b"\\n", form one byte stream; window w is the tokens of that stream from byte w * stride on,
the first seq_len + 1 of them (bytes: the bytes themselves, stride seq_len, so consecutive
windows share one byte, as the lm's text file windows do; a `tokenizers` file: stride seq_len
times the bytes per token measured on the split's first records). A window is a function of
the corpus and w alone: any process, worker or start reads the same tokens.

Finding where window w starts needs every record's length: one pass over the corpus when it is
opened (`Records.lengths`), at ~GB/s from Parquet and at the reading speed of the records for
ArrayRecord. A record that is not UTF-8 is skipped and counted, in either format by one check
(`_utf8_lengths`).

A window reads only the bytes it needs: from Parquet, a slice of its row group's column
(`Records.read`), whatever the record's size; ArrayRecord's reader returns records whole, so
`write` keeps them to at most RECORD_BYTES (a longer text is cut at newlines, which keeps the
byte stream as it was) and a window reads at most a few of them.

`python -m launcher.corpus --out=DIR FILES...` writes text files as a corpus (see `main`).
"""

import bisect
import collections
import functools
import glob
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from launcher import storage
from launcher.errors import UsageError, one_line

FORMATS = ("parquet", "array_record")
SEPARATOR = b"\n"  # After every record in the byte stream.
ROW_GROUP_CACHE_BYTES = 256 << 20  # Parquet row groups kept per process (and worker).
RECORD_BYTES = 64 << 10  # The longest record `write` makes: what an ArrayRecord window may read.


def _format_of(name: str) -> str | None:
  if name.endswith(".parquet"):
    return "parquet"
  if ".array_record" in name:  # e.g. train.array_record-00000-of-00008
    return "array_record"
  return None


def find_files(location: str) -> tuple[str, list[str]]:
  """(format, the corpus's files sorted by name) at a directory, a glob or one file, local or
  gs://; one UsageError when there is no Parquet or ArrayRecord file there, or both kinds."""
  remote = location.startswith("gs://")
  if remote:
    storage.path(location)  # Checks the scheme and the bucket name.
    fs = storage._filesystem()  # pylint: disable=protected-access
    found = storage.call(
      f"listing {location}",
      storage.path(location),
      fs.glob,
      location if glob.has_magic(location) else location.rstrip("/") + "/*",
    )
    if not found and fs.isfile(location):
      found = [location]
    paths = sorted("gs://" + p.removeprefix("gs://") for p in found)
  elif os.path.isdir(location):
    paths = sorted(os.path.join(location, name) for name in os.listdir(location))
  else:
    paths = sorted(glob.glob(location))
  paths = [p for p in paths if _format_of(os.path.basename(p))]
  kinds = {_format_of(os.path.basename(p)) for p in paths}
  if not paths:
    raise UsageError(
      f"config.data={location!r}: no Parquet (*.parquet) or ArrayRecord "
      "(*.array_record*) files there: give a directory, a glob or a file of a corpus "
      "(python -m launcher.corpus writes one from text files)"
    )
  if len(kinds) > 1:
    raise UsageError(
      f"config.data={location!r} holds both Parquet and ArrayRecord files: point it "
      "at one kind (a glob such as DIR/*.parquet)"
    )
  if remote and kinds == {"array_record"}:
    raise UsageError(
      f"config.data={location!r}: ArrayRecord files are read from a local or "
      "shared filesystem (array_record's reader has no GCS); copy them there, or "
      "use Parquet shards, which are read from gs:// directly"
    )
  return kinds.pop(), paths


class Records:
  """The records of a corpus's files as bytes, by random access (grain's RandomAccessDataSource
  protocol: `len`, `[i]`). Picklable: files are opened lazily in each process that reads."""

  def __init__(self, location: str, column: str = "text"):
    self.location, self.column = location, column
    self.format, self.paths = find_files(location)
    self._open: dict = {}  # Open files and cached row groups, in this process.
    counts = [self._count(f) for f in range(len(self.paths))]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def __getstate__(self):
    return {**self.__dict__, "_open": {}}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> bytes:
    return self.read(index)

  def read(self, index: int, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end) of record `index` (to its end without `end`). From Parquet only those
    bytes are copied, out of its row group's column; ArrayRecord's reader returns the record
    whole."""
    f = bisect.bisect_right(self._starts, index) - 1
    row = int(index - self._starts[f])
    if self.format == "array_record":
      return self._array_record(f)[row][start:end]
    import pyarrow as pa  # pylint: disable=import-outside-toplevel

    group, first = self._row_group_of(f, row)
    rows = self._row_group(f, group)
    _, offsets, data = rows.buffers()
    offsets = np.frombuffer(offsets, np.int64 if rows.type == pa.large_binary() else np.int32)
    at = rows.offset + row - first
    begin, length = int(offsets[at]), int(offsets[at + 1] - offsets[at])
    start, end = min(start, length), length if end is None else min(end, length)
    return data.slice(begin + start, max(0, end - start)).to_pybytes()

  def lengths(self) -> np.ndarray:
    """Every record's length in bytes (int64), -1 for a record that is not UTF-8."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel

    parts = []
    for f, path in enumerate(self.paths):
      if self.format == "parquet":
        for group in range(self._parquet(f).metadata.num_row_groups):
          parts.append(_utf8_lengths(self._row_group(f, group)))
      else:
        source = self._array_record(f)
        for first in range(0, len(source), 1024):
          records = source.__getitems__(range(first, min(first + 1024, len(source))))
          parts.append(_utf8_lengths(pa.array(records, pa.large_binary())))
      logging.debug("indexed %s", path)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

  def _count(self, f: int) -> int:
    """File `f`'s number of records, after checking that it reads and has the text column."""
    path = self.paths[f]
    try:
      if self.format == "array_record":
        return len(self._array_record(f))
      metadata = self._parquet(f).metadata
    except UsageError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Whatever a damaged file raises.
      raise UsageError(
        f"config.data: {path} cannot be read as {self.format} ({one_line(e, 200)})"
      ) from None
    columns = metadata.schema.to_arrow_schema()
    if self.column not in columns.names:
      raise UsageError(
        f"config.data: {path} has no column {self.column!r} (its columns: "
        f"{', '.join(columns.names)}): write the text into a column named "
        f"{self.column!r}"
      )
    kind = str(columns.field(self.column).type)
    if kind not in ("string", "large_string", "binary", "large_binary"):
      raise UsageError(f"config.data: {path}'s column {self.column!r} holds {kind}, not text")
    return metadata.num_rows

  def _parquet(self, f: int):
    if ("file", f) not in self._open:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

      path = self.paths[f]
      # fsspec's plain read-ahead cache (gcsfs's "adaptive" default leaves prefetch tasks
      # pending at exit).
      source = (
        storage._filesystem().open(path, "rb", cache_type="readahead")  # pylint: disable=protected-access
        if path.startswith("gs://")
        else path
      )
      self._open[("file", f)] = pq.ParquetFile(source)
    return self._open[("file", f)]

  def _row_group_of(self, f: int, row: int) -> tuple[int, int]:
    """(row group, its first row) of row `row` of file `f`."""
    if ("groups", f) not in self._open:
      metadata = self._parquet(f).metadata
      sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
      self._open[("groups", f)] = np.concatenate([[0], np.cumsum(sizes)])
    starts = self._open[("groups", f)]
    group = bisect.bisect_right(starts, row) - 1
    return group, int(starts[group])

  def _row_group(self, f: int, group: int):
    """One row group's text column as binary (large_binary from a large column). Parquet reads
    a row group whole, so the ones read are kept, up to ROW_GROUP_CACHE_BYTES per process (the
    least recently used go first)."""
    cache = self._open.setdefault("row groups", collections.OrderedDict())
    if (f, group) in cache:
      cache.move_to_end((f, group))
      return cache[(f, group)]
    import pyarrow as pa  # pylint: disable=import-outside-toplevel

    column = self._parquet(f).read_row_group(group, columns=[self.column]).column(0)
    large = pa.types.is_large_string(column.type) or pa.types.is_large_binary(column.type)
    rows = cache[(f, group)] = column.combine_chunks().cast(
      pa.large_binary() if large else pa.binary()
    )
    while sum(value.nbytes for value in cache.values()) > ROW_GROUP_CACHE_BYTES and len(cache) > 1:
      cache.popitem(last=False)
    return rows

  def _array_record(self, f: int):
    if ("file", f) not in self._open:
      from grain.sources import ArrayRecordDataSource  # pylint: disable=import-outside-toplevel

      self._open[("file", f)] = ArrayRecordDataSource([self.paths[f]])
    return self._open[("file", f)]


NOT_UTF8, NULL = -1, -2  # The length of a record that is skipped, and why.


def _utf8_lengths(records) -> np.ndarray:
  """Each record's length in bytes (int64), NOT_UTF8 for one that is not UTF-8 and NULL for a
  missing value (a Parquet null): the one check of every format, so such a record is skipped and
  counted whatever the corpus is made of. `records` is a pyarrow binary or large_binary array."""
  import pyarrow.compute as pc  # pylint: disable=import-outside-toplevel

  lengths = pc.binary_length(records).fill_null(NULL).to_numpy(zero_copy_only=False)
  lengths = lengths.astype(np.int64)
  lengths[_not_utf8(records.fill_null(b""))] = NOT_UTF8
  return lengths


def _not_utf8(records, first: int = 0) -> list[int]:
  """The indices of the records that are not UTF-8: one cast to text validates them all, and a
  batch that fails is halved until its bad records are found."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel

  try:
    records.cast(pa.large_string() if pa.types.is_large_binary(records.type) else pa.string())
    return []
  except pa.ArrowInvalid:
    if len(records) == 1:
      return [first]
  half = len(records) // 2
  return _not_utf8(records.slice(0, half), first) + _not_utf8(records.slice(half), first + half)


class Tokenizer:
  """Bytes (vocabulary 256) or a Hugging Face `tokenizers` file (tokenizer.json)."""

  def __init__(self, path: str = ""):
    self.path = path
    self._tokenizer = None
    if path:
      self._load()

  def __getstate__(self):
    return {"path": self.path, "_tokenizer": None}

  def _load(self):
    if self._tokenizer is None:
      try:
        from tokenizers import Tokenizer as HfTokenizer  # pylint: disable=import-outside-toplevel
      except ImportError:
        raise UsageError(
          "config.tokenizer needs Hugging Face tokenizers: pip install -e '.[data]'"
        ) from None
      try:
        self._tokenizer = HfTokenizer.from_file(self.path)
      except Exception as e:  # pylint: disable=broad-except  # Its Rust errors.
        raise UsageError(
          f"config.tokenizer={self.path!r} does not load as a Hugging Face "
          f"tokenizers file ({one_line(e, 200)}): give a tokenizer.json"
        ) from None
    return self._tokenizer

  @property
  def vocab_size(self) -> int:
    return self._load().get_vocab_size() if self.path else 256

  def encode(self, data: bytes) -> np.ndarray:
    if not self.path:
      return np.frombuffer(data, np.uint8).astype(np.int32)
    return np.asarray(self._load().encode(data.decode("utf-8", errors="ignore")).ids, np.int32)

  def decode(self, tokens) -> str:
    """The text of `tokens` (a byte sequence that is not UTF-8 shows U+FFFD where it breaks)."""
    if not self.path:
      return bytes(np.asarray(tokens, np.uint8)).decode("utf-8", errors="replace")
    return self._load().decode([int(t) for t in tokens])


class Windows:
  """Windows of `seq_len + 1` tokens over records [first, last) of `records` (see the module's
  docstring), by random access; each is {"tokens": int32 [seq_len + 1], "id": its index}."""

  def __init__(
    self,
    records: Records,
    lengths: np.ndarray,
    first: int,
    last: int,
    seq_len: int,
    tokenizer: Tokenizer,
  ):
    self.records, self.seq_len, self.tokenizer = records, seq_len, tokenizer
    kept = np.flatnonzero(lengths[first:last] >= 0) + first
    self._record_ids = kept
    self._ends = np.cumsum(lengths[kept] + len(SEPARATOR))
    self.total_bytes = int(self._ends[-1]) if len(kept) else 0
    self.stride = seq_len if not tokenizer.path else self._bytes_per_window()
    self._windows = (
      max(0, (self.total_bytes - 1) // seq_len)
      if not tokenizer.path
      else max(0, self.total_bytes // self.stride - 1)
    )

  def __len__(self) -> int:
    return self._windows

  def __getitem__(self, w: int) -> dict:
    w = int(w)
    start = w * self.stride
    want = self.seq_len + 1
    if not self.tokenizer.path:
      tokens = self.tokenizer.encode(self._bytes(start, start + want))
    else:
      tokens, end = np.zeros(0, np.int32), start + self.stride * 5 // 4 + 16
      while len(tokens) < want:  # Rarely more than once: the stride is measured, +25% here.
        tokens = self.tokenizer.encode(self._bytes(start, min(end, self.total_bytes)))
        if end >= self.total_bytes:  # The split's end: its start follows.
          tokens = np.concatenate([tokens, self.tokenizer.encode(self._bytes(0, 4 * self.stride))])
          break
        end += self.stride // 2 + 16
    return {"tokens": tokens[:want], "id": np.int32(w)}

  def _bytes(self, start: int, end: int) -> bytes:
    """Bytes [start, end) of the split's stream, read as those byte ranges of its records."""
    pieces, position = [], start
    for k in range(bisect.bisect_right(self._ends, start), len(self._ends)):
      if position >= end:
        break
      record_start, record_end = (int(self._ends[k - 1]) if k else 0), int(self._ends[k])
      length = record_end - record_start - len(SEPARATOR)
      first, last = position - record_start, min(end, record_end) - record_start
      if first < length:
        pieces.append(self.records.read(int(self._record_ids[k]), first, min(last, length)))
      pieces.append(SEPARATOR[max(0, first - length) : max(0, last - length)])
      position = record_start + last
    return b"".join(pieces)

  def _bytes_per_window(self) -> int:
    """The bytes that hold seq_len tokens, measured on the split's first records (up to 1 MB)."""
    sample = self._bytes(0, min(self.total_bytes, 1 << 20))
    tokens = max(1, len(self.tokenizer.encode(sample)))
    return max(1, int(len(sample) / tokens * self.seq_len))


@functools.cache
def _records_and_lengths(location: str) -> tuple[Records, np.ndarray]:
  records = Records(location)
  lengths = records.lengths()
  for marker, what in ((NOT_UTF8, "that are not UTF-8"), (NULL, "that are null (no value)")):
    skipped = int((lengths == marker).sum())
    if skipped:
      logging.warning(
        "config.data=%s: skipped %d of %d records %s", location, skipped, len(lengths), what
      )
  if records.format == "array_record" and len(lengths) and lengths.max() > 16 * RECORD_BYTES:
    logging.warning(
      "config.data=%s: records of up to %.1f MB, and ArrayRecord reads a record whole for each "
      "window in it: python -m launcher.corpus rewrites them in records of at most %d KiB",
      location,
      lengths.max() / 1e6,
      RECORD_BYTES >> 10,
    )
  return records, lengths


def windows(
  location: str, split: str, *, seq_len: int, eval_fraction: float, tokenizer: Tokenizer
) -> Windows:
  """The split's windows of a corpus: eval is its last `eval_fraction` of records (at least one),
  train the rest; they share no record."""
  records, lengths = _records_and_lengths(location)
  if len(records) < 2:
    raise UsageError(
      f"config.data={location!r} holds {len(records)} record(s): a corpus needs at "
      "least two (one for training, one held out)"
    )
  eval_start = min(len(records) - 1, int(len(records) * (1 - eval_fraction)))
  first, last = (0, eval_start) if split == "train" else (eval_start, len(records))
  return Windows(records, lengths, first, last, seq_len, tokenizer)


def bounded(texts: Sequence[str], record_bytes: int = RECORD_BYTES) -> tuple[list[str], int]:
  """(`texts` as records of at most `record_bytes` bytes of UTF-8, how many cuts added a newline).
  A longer text is cut at its last newline within the bound, which becomes the separator after
  the record: the byte stream stays the same. A stretch of `record_bytes` without a newline is cut
  at a character boundary, and the stream holds a newline there that the text does not."""
  records, added = [], 0
  for text in texts:
    data, position = text.encode("utf-8"), 0
    while len(data) - position > record_bytes:
      cut = data.rfind(SEPARATOR, position, position + record_bytes + 1)
      if cut >= 0:
        records.append(data[position:cut].decode("utf-8"))
        position = cut + len(SEPARATOR)
        continue
      cut = position + record_bytes
      while data[cut] & 0xC0 == 0x80:  # A UTF-8 continuation byte: not a character's start.
        cut -= 1
      records.append(data[position:cut].decode("utf-8"))
      position, added = cut, added + 1
    records.append(data[position:].decode("utf-8") if position else text)
  return records, added


def write(
  texts: Sequence[str],
  out: str,
  *,
  format: str = "parquet",
  shards: int = 1,  # pylint: disable=redefined-builtin
  row_group_size: int = 1024,
  record_bytes: int = RECORD_BYTES,
) -> list[str]:
  """Writes `texts` (one record each, a longer one than `record_bytes` as several: `bounded`) as
  `shards` files of a corpus under the directory `out`; returns their paths."""
  if format not in FORMATS:
    raise UsageError(f"format={format!r} is not one of {', '.join(FORMATS)}")
  texts, _ = bounded(texts, record_bytes)
  os.makedirs(out, exist_ok=True)
  paths = []
  for shard in range(shards):
    part = texts[len(texts) * shard // shards : len(texts) * (shard + 1) // shards]
    if format == "parquet":
      import pyarrow as pa  # pylint: disable=import-outside-toplevel
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

      path = os.path.join(out, f"data-{shard:05d}-of-{shards:05d}.parquet")
      pq.write_table(
        pa.table({"text": pa.array(list(part), pa.string())}), path, row_group_size=row_group_size
      )
    else:
      from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

      path = os.path.join(out, f"data.array_record-{shard:05d}-of-{shards:05d}")
      writer = ArrayRecordWriter(path, "group_size:1")
      for text in part:
        writer.write(text.encode("utf-8"))
      writer.close()
    paths.append(path)
  return paths


RECORD_KINDS = {
  "file": lambda text: [text],
  "paragraph": lambda text: [p.strip("\n") for p in text.split("\n\n") if p.strip()],
  "line": lambda text: [line for line in text.splitlines() if line.strip()],
}


def main(argv: Sequence[str]) -> None:
  """python -m launcher.corpus --out=DIR [--format=parquet|array_record] [--shards=N]
  [--record=paragraph|line|file] FILE...: writes the UTF-8 text files as a corpus, one record per
  paragraph (default), line or file; a record longer than RECORD_BYTES is written as several
  (`bounded`)."""
  if len(argv) < 2:
    raise UsageError("name the UTF-8 text files to write as a corpus after the flags")
  texts = []
  for name in argv[1:]:
    try:
      with open(name, encoding="utf-8") as f:
        texts.extend(RECORD_KINDS[_RECORD.value](f.read()))
    except (OSError, UnicodeDecodeError) as e:
      raise UsageError(f"cannot read {name} as UTF-8 text: {one_line(e)}") from None
  records, added = bounded(texts)
  paths = write(records, _OUT.value, format=_FORMAT.value, shards=_SHARDS.value)
  cut = (
    f"; {added} cut(s) inside lines longer than {RECORD_BYTES >> 10} KiB added a newline"
    if added
    else ""
  )
  print(
    f"wrote {len(records)} records ({sum(len(t.encode()) for t in records):,} bytes) as "
    f"{len(paths)} {_FORMAT.value} file(s) in {_OUT.value}{cut}; train on them with "
    f"--config.data={_OUT.value}"
  )


if __name__ == "__main__":
  from absl import flags  # pylint: disable=ungrouped-imports

  _OUT = flags.DEFINE_string("out", None, "The directory to write the corpus into.", required=True)
  _FORMAT = flags.DEFINE_enum("format", "parquet", FORMATS, "The files' format.")
  _SHARDS = flags.DEFINE_integer("shards", 1, "How many files.", lower_bound=1)
  _RECORD = flags.DEFINE_enum(
    "record", "paragraph", list(RECORD_KINDS), "What of the text files one record is."
  )
  from launcher import console  # pylint: disable=ungrouped-imports

  console.run_tool(main)
