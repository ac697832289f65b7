"""A corpus of Parquet or ArrayRecord shards through launcher.data.from_source: the windows are
the byte stream's as computed by hand, the same from either format, any worker count and any
process layout; bad corpora are one line."""

import itertools
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from launcher import corpus, storage, train
from launcher.errors import UsageError
from tests.gcs_emulator import Emulator
from tests.helpers import (
  REPO,
  finish,
  launcher_command,
  load_config,
  losses_by_step,
  read_metrics,
  start,
  wait_for,
)
from workloads import lm

RECORDS = [
  f"Record {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 7)
  for i in range(300)
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """The same records as 3 Parquet files (row groups of 16) and as 2 ArrayRecord files."""
  root = tmp_path_factory.mktemp("corpus")
  corpus.write(RECORDS, str(root / "parquet"), format="parquet", shards=3, row_group_size=16)
  corpus.write(RECORDS, str(root / "array_record"), format="array_record", shards=2)
  return root


def lm_config(data, **overrides):
  return load_config("lm", "tiny", data=str(data), batch_size=16, seq_len=32, **overrides)


def batches(config, split="train", process_index=0, process_count=1, start=0, count=3):
  return list(
    itertools.islice(lm.dataset(config, split, process_index, process_count, start), count)
  )


def test_windows_are_the_byte_stream_cut_by_hand(shards):
  eval_start = int(len(RECORDS) * 0.95)
  stream = b"".join(text.encode() + b"\n" for text in RECORDS[:eval_start])
  config = lm_config(shards / "parquet")
  windows = corpus.windows(
    config.data, "train", seq_len=32, eval_fraction=0.05, tokenizer=corpus.Tokenizer()
  )
  assert len(windows) == (len(stream) - 1) // 32
  for w in (0, 1, 57, len(windows) - 1):
    assert bytes(windows[w]["tokens"].astype(np.uint8)) == stream[w * 32 : w * 32 + 33]
  eval_stream = b"".join(text.encode() + b"\n" for text in RECORDS[eval_start:])
  eval_windows = corpus.windows(
    config.data, "eval", seq_len=32, eval_fraction=0.05, tokenizer=corpus.Tokenizer()
  )
  assert bytes(eval_windows[0]["tokens"].astype(np.uint8)) == eval_stream[:33]  # No overlap.
  # A train batch is windows of the seeded order: the ids name them.
  batch = batches(config)[1]
  for row, w in zip(batch["tokens"], batch["id"]):
    assert bytes(row.astype(np.uint8)) == stream[w * 32 : w * 32 + 33]


def test_parquet_and_array_record_copies_give_the_same_batches_on_any_layout(shards):
  parquet = batches(lm_config(shards / "parquet"), start=5)
  array_record = batches(lm_config(shards / "array_record"), start=5)
  halves = [
    batches(lm_config(shards / "parquet"), process_index=i, process_count=2, start=5)
    for i in range(2)
  ]
  for p, a, first, second in zip(parquet, array_record, *halves):
    np.testing.assert_array_equal(p["tokens"], a["tokens"])
    np.testing.assert_array_equal(np.concatenate([first["tokens"], second["tokens"]]), p["tokens"])
  assert len({tuple(b["id"]) for b in parquet}) == 3


@pytest.mark.slow  # Worker processes start in ~2 s each.
def test_worker_processes_give_the_same_batches(shards):
  config = lm_config(shards / "parquet")
  in_process = batches(config, start=7, count=5)
  in_workers = batches(lm_config(shards / "parquet", data_workers=2), start=7, count=5)
  for a, b in zip(in_process, in_workers, strict=True):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["id"], b["id"])


@pytest.mark.slow  # Compiles the lm's loss.
def test_a_tokenizer_file_sets_the_vocabulary_and_packs_its_tokens(shards, tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(
    RECORDS,
    trainers.BpeTrainer(
      vocab_size=400, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  config = lm_config(shards / "parquet", tokenizer=str(tmp_path / "tokenizer.json"))
  vocab = tokenizer.get_vocab_size()
  params = jax.eval_shape(lambda: lm.init(config, jax.random.PRNGKey(0)))
  assert params["Embed_0"]["embedding"].shape == (vocab, 64)
  windows = corpus.windows(
    config.data,
    "train",
    seq_len=32,
    eval_fraction=0.05,
    tokenizer=corpus.Tokenizer(config.tokenizer),
  )
  stream = "".join(text + "\n" for text in RECORDS)
  for w in (0, 3, len(windows) - 1):
    tokens = windows[w]["tokens"]
    assert len(tokens) == 33 and tokens.max() < vocab
    assert tokenizer.decode(tokens.tolist()) in stream  # 33 tokens of the text, in order.
  batch = batches(config)[0]
  loss, metrics = jax.jit(lambda params, batch: lm.loss(config, params, batch, None))(
    lm.init(config, jax.random.PRNGKey(0)), batch
  )
  assert set(metrics) == {"bits_per_token", "accuracy"}
  assert float(loss) == pytest.approx(np.log(vocab), rel=0.05)  # Untrained: about uniform.


NOT_UTF8 = [b"first record\n", b"\xff\xfe not text", b"third record", b"cut \xe2\x82"] * 15


def write_records(directory, records: list[bytes], fmt: str, column_type=None):
  """`records` as they are, in one file: ArrayRecord, or a Parquet column of `column_type`."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

  os.makedirs(directory)
  if fmt == "parquet":
    table = pa.table({"text": pa.array(records, column_type or pa.binary())})
    pq.write_table(table, str(directory / "x.parquet"), row_group_size=7)
    return
  writer = ArrayRecordWriter(str(directory / "x.array_record"), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


@pytest.mark.parametrize(
  "fmt, column_type", [("array_record", None), ("parquet", "binary"), ("parquet", "large_binary")]
)
def test_a_record_that_is_not_utf8_is_skipped_and_counted_in_every_format(
  fmt, column_type, tmp_path, caplog
):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel

  write_records(tmp_path / "c", NOT_UTF8, fmt, column_type and getattr(pa, column_type)())
  windows = corpus.windows(
    str(tmp_path / "c"), "train", seq_len=8, eval_fraction=0.05, tokenizer=corpus.Tokenizer()
  )
  assert "skipped 30 of 60 records that are not UTF-8" in caplog.text
  stream = b"".join(
    windows[w]["tokens"].astype(np.uint8).tobytes()[:8] for w in range(len(windows))
  )
  kept = b"".join(
    r + b"\n" for r in NOT_UTF8[: int(60 * 0.95)] if not r.startswith((b"\xff", b"cut"))
  )
  assert stream == kept[: len(stream)] and len(kept) - len(stream) < 9


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("column_type", ["string", "large_binary"])
def test_null_values_of_a_parquet_column_are_skipped_and_counted_apart(
  column_type, tmp_path, caplog
):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel

  texts = [None if i % 3 == 0 else f"text {i}" for i in range(60)]
  records = [None if t is None else (t if column_type == "string" else t.encode()) for t in texts]
  write_records(tmp_path / "c", records, "parquet", getattr(pa, column_type)())
  windows = corpus.windows(
    str(tmp_path / "c"), "train", seq_len=8, eval_fraction=0.05, tokenizer=corpus.Tokenizer()
  )
  assert "skipped 20 of 60 records that are null (no value)" in caplog.text
  assert "not UTF-8" not in caplog.text
  stream = b"".join(
    windows[w]["tokens"].astype(np.uint8).tobytes()[:8] for w in range(len(windows))
  )
  kept = b"".join(t.encode() + b"\n" for t in texts[: int(60 * 0.95)] if t is not None)
  assert stream == kept[: len(stream)] and len(kept) - len(stream) < 9


def huge_text(megabytes: float) -> str:
  """Lines of text, some with characters of 2 to 4 bytes, to `megabytes`."""
  lines, size, n = [], 0, 0
  while size < megabytes * 2**20:
    line = f"line {n}: déjà vu, €{n}, 𝄞 " + "the quick brown fox. " * (n % 13)
    lines.append(line)
    size, n = size + len(line.encode()) + 1, n + 1
  return "\n".join(lines)


def bytes_copied(windows, ids) -> int:
  """The most bytes the Python heap held at once (tracemalloc's peak) while reading one window."""
  import tracemalloc  # pylint: disable=import-outside-toplevel

  windows[int(ids[0])]  # Parquet's row group is read (into Arrow's memory) and kept.
  tracemalloc.start()
  try:
    peaks = []
    for w in ids:
      tracemalloc.reset_peak()
      base = tracemalloc.get_traced_memory()[0]
      windows[int(w)]
      peaks.append(tracemalloc.get_traced_memory()[1] - base)
  finally:
    tracemalloc.stop()
  return max(peaks)


def test_a_window_of_a_huge_parquet_record_reads_only_its_bytes(tmp_path):
  """One 8 MB record (a Parquet file from elsewhere: launcher.corpus would cut it): the windows
  are the stream's bytes, and each copies ~its own bytes, not the record."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  text = huge_text(8)
  os.makedirs(tmp_path / "c")
  pq.write_table(pa.table({"text": [text, "the end"]}), str(tmp_path / "c" / "x.parquet"))
  records = corpus.Records(str(tmp_path / "c"))
  lengths = records.lengths()
  assert lengths.max() > 8 * 2**20
  windows = corpus.Windows(records, lengths, 0, 2, 256, corpus.Tokenizer())
  stream = text.encode() + b"\nthe end\n"
  ids = [0, 1, 12345, len(windows) // 2, len(windows) - 2, len(windows) - 1]
  for w in ids:
    assert windows[w]["tokens"].astype(np.uint8).tobytes() == stream[w * 256 : w * 256 + 257]
  assert bytes_copied(windows, ids) < 16 << 10  # The record is 8 MB; a window 257 bytes.


@pytest.mark.parametrize("fmt", ["parquet", "array_record"])
def test_the_writer_cuts_a_huge_text_at_newlines_and_the_windows_stay_the_same(fmt, tmp_path):
  text = huge_text(4)
  corpus.write([text, "the end"], str(tmp_path / "c"), format=fmt)
  records = corpus.Records(str(tmp_path / "c"))
  lengths = records.lengths()
  assert len(records) > 4 * 2**20 // corpus.RECORD_BYTES and lengths.max() <= corpus.RECORD_BYTES
  assert b"\n".join(records[i] for i in range(len(records))) == text.encode() + b"\nthe end"
  windows = corpus.Windows(records, lengths, 0, len(records), 256, corpus.Tokenizer())
  stream = text.encode() + b"\nthe end\n"  # As one record: the cuts are the separators.
  assert len(windows) == (len(stream) - 1) // 256
  ids = np.random.default_rng(0).integers(0, len(windows), 40)
  for w in [0, len(windows) - 1, *ids]:
    assert windows[w]["tokens"].astype(np.uint8).tobytes() == stream[w * 256 : w * 256 + 257]
  # ArrayRecord's reader returns records whole: a window reads at most its two records.
  assert bytes_copied(windows, ids) < 3 * corpus.RECORD_BYTES


def test_tokenized_windows_of_one_huge_record_and_of_its_cut_copy_are_the_same(tmp_path):
  """A BPE over text with 2- to 4-byte characters: the same tokens whether the text is one 3 MB
  Parquet record or ArrayRecord records cut by the writer (no character is split)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  text = huge_text(3)
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(
    [text[:20000]],
    trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
  )
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  os.makedirs(tmp_path / "one")
  pq.write_table(pa.table({"text": [text]}), str(tmp_path / "one" / "x.parquet"))
  corpus.write([text], str(tmp_path / "cut"), format="array_record")
  one, cut = (
    corpus.Windows(
      records,
      records.lengths(),
      0,
      len(records),
      64,
      corpus.Tokenizer(str(tmp_path / "tokenizer.json")),
    )
    for records in (corpus.Records(str(tmp_path / d)) for d in ("one", "cut"))
  )
  assert len(cut.records) > 40 and len(one) == len(cut) > 1000
  for w in [0, len(one) - 1, *np.random.default_rng(1).integers(0, len(one), 30)]:
    np.testing.assert_array_equal(one[w]["tokens"], cut[w]["tokens"])
    assert len(one[w]["tokens"]) == 65 and tokenizer.decode(one[w]["tokens"].tolist()) in text


def test_a_line_longer_than_a_record_is_cut_between_characters():
  text = "€𝄞é" * 10_000  # 9 bytes a round, no newline.
  records, added = corpus.bounded([text, "short"], record_bytes=1000)
  assert "".join(records[:-1]) == text and records[-1] == "short"
  assert added == len(records) - 2 and max(len(r.encode()) for r in records) <= 1000
  assert corpus.bounded(["a\nb", "c"], record_bytes=1000) == (["a\nb", "c"], 0)


def test_an_array_record_corpus_of_huge_records_is_named(tmp_path, caplog):
  write_records(tmp_path / "c", [huge_text(2).encode(), b"the end"], "array_record")
  corpus.windows(
    str(tmp_path / "c"), "train", seq_len=8, eval_fraction=0.05, tokenizer=corpus.Tokenizer()
  )
  assert "records of up to 2.1 MB, and ArrayRecord reads a record whole" in caplog.text


@pytest.mark.parametrize(
  "case, message",
  [
    (
      "empty directory",
      r"config.data=.*: no Parquet \(\*.parquet\) or ArrayRecord "
      r"\(\*.array_record\*\) files there",
    ),
    (
      "no text column",
      r"has no column 'text' \(its columns: body\): write the text into a "
      r"column named 'text'",
    ),
    ("numbers, not text", r"'s column 'text' holds int64, not text"),
    (
      "shorter than a batch",
      r"its train split \(.* bytes\) holds 2 window\(s\) of seq_len \+ 1 = "
      r"33 tokens, fewer than one global batch of 16",
    ),
    (
      "tokenizer that does not load",
      r"config.tokenizer=.* does not load as a Hugging Face "
      r"tokenizers file",
    ),
    ("text_file and data", r"both name a corpus: keep one"),
  ],
)
def test_bad_corpora_are_one_line(case, message, tmp_path, shards):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  data, overrides = tmp_path / "c", {}
  data.mkdir()
  if case == "no text column":
    pq.write_table(pa.table({"body": ["a", "b"]}), data / "x.parquet")
  elif case == "numbers, not text":
    pq.write_table(pa.table({"text": [1, 2]}), data / "x.parquet")
  elif case == "shorter than a batch":
    corpus.write(["x" * 40, "y" * 40, "z"], str(data))
  elif case == "tokenizer that does not load":
    data = shards / "parquet"
    (tmp_path / "tokenizer.json").write_text("{not json")
    overrides["tokenizer"] = str(tmp_path / "tokenizer.json")
  elif case == "text_file and data":
    data = shards / "parquet"
    overrides["text_file"] = str(tmp_path / "t.txt")
  with pytest.raises(UsageError, match=message):
    lm.init(lm_config(data, **overrides), jax.random.PRNGKey(0))
    batches(lm_config(data, **overrides))


LM_ARGS = [
  "--config=configs/lm.py:tiny",
  "--config.batch_size=16",
  "--config.seq_len=32",
  "--config.num_steps=30",
  "--config.log_every_steps=1",
  "--config.eval_every_steps=0",
  "--config.checkpoint_every_steps=10",
  "--config.warmup_steps=2",
]


@pytest.mark.slow
def test_a_parquet_corpus_trains_the_same_on_2x4_processes_after_a_kill(shards, tmp_path):
  """1 process x 8 devices reading in the main process; 2 x 4, killed (kill -9) after its step-10
  checkpoint and started again with a worker process each: the same losses."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.run(
    lm_config(
      shards / "parquet",
      num_steps=30,
      log_every_steps=1,
      eval_every_steps=0,
      checkpoint_every_steps=10,
      warmup_steps=2,
    ),
    str(straight),
  )
  args = [*LM_ARGS, f"--config.data={shards / 'parquet'}", f"--workdir={resumed}"]
  log = tmp_path / "run.log"
  process = start(launcher_command(*args, num_processes=2, devices=4), log, devices=4)
  wait_for(
    lambda: (resumed / "checkpoints" / "10").is_dir(), 180, "the step-10 checkpoint", process
  )
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  killed_at = max(row["step"] for row in read_metrics(resumed))
  saved = max(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
  assert 10 <= saved <= killed_at < 30  # Killed mid-run, after a checkpoint.
  restart = launcher_command(*args, "--config.data_workers=1", num_processes=2, devices=4)
  assert finish(start(restart, log, devices=4), 180) == 0, log.read_text()[-3000:]
  assert f"resuming from the checkpoint of step {saved}" in log.read_text()
  one, two = losses_by_step(str(straight)), losses_by_step(str(resumed))
  assert list(two) == list(range(1, 31))
  assert [two[s] for s in two] == pytest.approx([one[s] for s in one], rel=1e-4)


@pytest.mark.slow
def test_a_gs_corpus_trains_as_its_local_copy(shards, tmp_path, monkeypatch):
  emulator = Emulator(tmp_path / "gcs", tmp_path / "gcs.log")
  try:
    emulator.bucket("corpora")
    for name, value in emulator.env.items():
      monkeypatch.setenv(name, value)
    for path in (shards / "parquet").iterdir():
      storage.write_bytes(storage.path(f"gs://corpora/text/{path.name}"), path.read_bytes())
    overrides = dict(num_steps=4, log_every_steps=1, eval_every_steps=0, warmup_steps=1)
    train.run(lm_config("gs://corpora/text", **overrides), str(tmp_path / "remote"))
    train.run(lm_config(shards / "parquet", **overrides), str(tmp_path / "local"))
  finally:
    emulator.stop()
  remote, local = read_metrics(tmp_path / "remote"), read_metrics(tmp_path / "local")
  assert [r["loss"] for r in remote] == [r["loss"] for r in local] and len(remote) == 4


def test_the_corpus_maker_writes_what_the_readme_trains_on(tmp_path):
  (tmp_path / "a.txt").write_text("one paragraph.\n\nanother one\nwith two lines.\n\n\n")
  (tmp_path / "b.txt").write_text("a third.")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "launcher.corpus",
      f"--out={tmp_path / 'c'}",
      "--shards=2",
      str(tmp_path / "a.txt"),
      str(tmp_path / "b.txt"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert result.stdout.startswith(
    f"wrote 3 records ({14 + 27 + 8} bytes) as 2 parquet file(s) in {tmp_path / 'c'}"
  )
  records = corpus.Records(str(tmp_path / "c"))
  assert [records[i] for i in range(len(records))] == [
    b"one paragraph.",
    b"another one\nwith two lines.",
    b"a third.",
  ]
  assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
    "data-00000-of-00002.parquet",
    "data-00001-of-00002.parquet",
  ]
