"""How fast the corpus pipeline feeds the devices: host batches of the lm on a Parquet or
ArrayRecord corpus, local or gs:// (a local fake-gcs-server), bytes or a BPE tokenizer, read in the
main process or in 1 or 2 grain worker processes.

    python benchmarks/data.py          # a few minutes; prints the tables, writes JSON
    python benchmarks/data.py --parts=records   # only a window's cost by record size (~1 min)

Each row of the pipeline table times `--batches` host batches of `--batch_size` windows of
`--seq_len` + 1 tokens after the first (worker start-up and the corpus's opening are timed
apart). A step that takes longer than the row's ms/batch is not held up by the pipeline (it reads
ahead while the step runs); a shorter one waits for data, which the run's report shows as its
data-wait share.

The records table reads windows of 1025 bytes from one 32 MB text held as records of 1 KB, 1 MB
or 32 MB: a window should cost the same whatever the record size.
"""

import argparse
import itertools
import json
import os
import pathlib
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_corpus(root: pathlib.Path, megabytes: float) -> list[str]:
  """CPython's documentation text, its topics repeated (each copy numbered) to `megabytes`."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  texts, size, copy = [], 0, 0
  while size < megabytes * 2**20:
    for name in sorted(topics):
      text = f"[copy {copy}] {topics[name]}"
      texts.append(text)
      size += len(text.encode())
    copy += 1
  return texts


def train_tokenizer(texts: list[str], path: pathlib.Path, vocab_size: int) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(
    texts[:200],
    trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  tokenizer.save(str(path))


def measure(data: str, tokenizer: str, workers: int, args) -> dict:
  from launcher import corpus  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel
  from workloads import lm  # pylint: disable=import-outside-toplevel

  corpus._records_and_lengths.cache_clear()  # pylint: disable=protected-access  # Time the opening.
  lm._tokenizer_of.cache_clear()  # pylint: disable=protected-access
  config = load_config(
    "lm",
    "small",
    data=data,
    tokenizer=tokenizer,
    data_workers=workers,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
  )
  began = time.perf_counter()
  host_batches = lm.dataset(config, "train", 0, 1, start=0)
  opened = time.perf_counter()
  next(host_batches)
  first = time.perf_counter()
  for _ in itertools.islice(host_batches, args.batches):
    pass
  seconds = time.perf_counter() - first
  host_batches.close() if hasattr(host_batches, "close") else None
  per_batch = seconds / args.batches
  return {
    "open_s": opened - began,
    "first_batch_s": first - opened,
    "ms_per_batch": 1e3 * per_batch,
    "examples_per_s": args.batch_size / per_batch,
    "tokens_per_s": args.batch_size * args.seq_len / per_batch,
  }


def record_sizes(tmp: pathlib.Path, texts: list[str]) -> list[dict]:
  """ms per 32 windows (seq_len 1024, bytes) and the bytes one window copies, by record size."""
  import tracemalloc  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel

  from launcher import corpus  # pylint: disable=import-outside-toplevel

  text = "\n".join(texts).encode()[: 32 << 20].decode("utf-8", errors="ignore")
  print(
    f"\n{len(text.encode()) / 2**20:.0f} MB of text as records of a given size; 32 windows of "
    "1025 bytes at random, after one; bytes copied: tracemalloc's peak for one window\n"
  )
  print(
    "| format | records | record size | ms / 32 windows | bytes copied / window |\n"
    "| --- | --- | ---: | ---: | ---: |"
  )
  rows = []
  cases = [("parquet", size, size) for size in (1 << 10, 1 << 20, 32 << 20)]
  cases += [("array_record", size, corpus.RECORD_BYTES) for size in (1 << 10, 1 << 20, 32 << 20)]
  cases += [("array_record", size, size) for size in (1 << 20, 32 << 20)]
  for fmt, size, record_bytes in cases:
    out = tmp / f"records-{fmt}-{size}-{record_bytes}"
    corpus.write(corpus.bounded([text], size)[0], str(out), format=fmt, record_bytes=record_bytes)
    records = corpus.Records(str(out))
    lengths = records.lengths()
    windows = corpus.Windows(records, lengths, 0, len(records), 1024, corpus.Tokenizer())
    ids = np.random.default_rng(0).integers(0, len(windows), 33)
    windows[int(ids[0])]
    began = time.perf_counter()
    for w in ids[1:]:
      windows[int(w)]
    ms = 1e3 * (time.perf_counter() - began)
    tracemalloc.start()
    copied = []
    for w in ids[1:9]:
      tracemalloc.reset_peak()
      base = tracemalloc.get_traced_memory()[0]
      windows[int(w)]
      copied.append(tracemalloc.get_traced_memory()[1] - base)
    tracemalloc.stop()
    kept = "as written by launcher.corpus" if record_bytes == corpus.RECORD_BYTES else "as given"
    row = {
      "format": fmt,
      "records": kept,
      "record_size": size,
      "largest_record": int(lengths.max()),
      "ms_per_32_windows": ms,
      "bytes_copied_per_window": int(max(copied)),
    }
    rows.append(row)
    print(
      f"| {fmt} | {kept} | {_size(size)} (largest {_size(row['largest_record'])}) | {ms:.1f} | "
      f"{_size(row['bytes_copied_per_window'])} |",
      flush=True,
    )
  return rows


def _size(count: int) -> str:
  for unit, shift in (("MB", 20), ("KB", 10)):
    if count >= 1 << shift:
      return f"{count / (1 << shift):.0f} {unit}"
  return f"{count} B"


def pipeline(tmp: pathlib.Path, texts: list[str], args) -> list[dict]:
  """The lm's host batches by format, place, tokens and workers (the table in docs/data.md)."""
  from launcher import corpus, storage  # pylint: disable=import-outside-toplevel
  from tests.gcs_emulator import Emulator  # pylint: disable=import-outside-toplevel

  rows = []
  corpus.write(texts, str(tmp / "parquet"), format="parquet", shards=8, row_group_size=256)
  corpus.write(texts, str(tmp / "array_record"), format="array_record", shards=8)
  train_tokenizer(texts, tmp / "tokenizer.json", vocab_size=8192)
  emulator = Emulator(tmp / "gcs", tmp / "gcs.log")
  try:
    emulator.bucket("bench")
    os.environ.update(emulator.env)
    for path in sorted((tmp / "parquet").iterdir()):
      storage.write_bytes(storage.path(f"gs://bench/parquet/{path.name}"), path.read_bytes())
    cases = [
      (fmt, where, tok, workers)
      for fmt, where in (("parquet", "local"), ("array_record", "local"), ("parquet", "gs://"))
      for tok in ("bytes", "bpe")
      for workers in map(int, args.workers.split(","))
    ]
    # Parquet reads a row group whole: without the cache (a corpus much larger than it), each
    # window's read is a row group's (in this process: workers start with the default).
    cases += [("parquet, 1 row group cached", "local", tok, 0) for tok in ("bytes", "bpe")]
    print(
      f"corpus: {len(texts):,} records, {sum(len(t.encode()) for t in texts) / 2**20:.1f} MB "
      f"in 8 shards (Parquet row groups of 256 records); host batch {args.batch_size} x "
      f"{args.seq_len + 1} tokens; {os.cpu_count()} cores\n"
    )
    print(
      "| format | where | tokens | workers | open s | first batch s | ms/batch | "
      "examples/s | tokens/s |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    default_cache = corpus.ROW_GROUP_CACHE_BYTES
    for fmt, where, tok, workers in cases:
      corpus.ROW_GROUP_CACHE_BYTES = default_cache if "cached" not in fmt else 0
      folder = fmt.split(",")[0]
      data = str(tmp / folder) if where == "local" else f"gs://bench/{folder}"
      row = {
        "format": fmt,
        "where": where,
        "tokens": tok,
        "workers": workers,
        **measure(data, str(tmp / "tokenizer.json") if tok == "bpe" else "", workers, args),
      }
      rows.append(row)
      print(
        f"| {fmt} | {where} | {tok} | {workers} | {row['open_s']:.2f} | "
        f"{row['first_batch_s']:.2f} | {row['ms_per_batch']:.1f} | "
        f"{row['examples_per_s']:,.0f} | {row['tokens_per_s']:,.0f} |",
        flush=True,
      )
  finally:
    emulator.stop()
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--megabytes", type=float, default=16)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--parts", default="pipeline,records", help="pipeline, records or both")
  parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "data.json"))
  args = parser.parse_args()
  from absl import flags, logging  # pylint: disable=import-outside-toplevel

  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  results = {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if "records" in args.parts:
      results["record_sizes"] = record_sizes(tmp, make_corpus(tmp, 33))
    if "pipeline" in args.parts:
      results["rows"] = pipeline(tmp, make_corpus(tmp, args.megabytes), args)
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()
