"""A byte-level decoder-only transformer LM. `configs/lm.py:SIZE` picks a size:

  tiny    ~0.1M params, seq 64: trains in a minute on 8 simulated CPU devices.
  small   ~86M params (GPT-2 small's shape), seq 1024, global batch 256: the default, accelerators.
  medium  ~300M params (GPT-2 medium's shape), seq 1024, global batch 256: accelerators.

The corpus is CPython's documentation text unless `--config.text_file=PATH` names your own text
file, or `--config.data=DIR` a corpus of Parquet or ArrayRecord shards (local or gs://).
"""

from launcher import config as launcher_config

SIZES = {
  #          width, layers, heads, seq_len, batch_size, learning_rate, num_steps
  "tiny": (64, 2, 4, 64, 64, 3e-3, 300),
  "small": (768, 12, 12, 1024, 256, 6e-4, 20_000),
  "medium": (1024, 24, 16, 1024, 256, 3e-4, 20_000),
}


def get_config(size: str = "small"):
  if size not in SIZES:
    raise ValueError(f"unknown lm size {size!r}: use configs/lm.py:{' or :'.join(SIZES)}")
  width, num_layers, num_heads, seq_len, batch_size, learning_rate, num_steps = SIZES[size]
  config = launcher_config.defaults()
  config.workload = "lm"
  config.width = width  # model width (embedding size)
  config.num_layers = num_layers  # transformer blocks
  config.num_heads = num_heads  # attention heads; must divide width
  config.seq_len = seq_len  # tokens per example (tokens/s counts these)
  config.dropout_rate = 0.0  # dropout in training (eval runs without)
  config.scan_layers = size != "tiny"  # the blocks as one nn.scan (fsdp gathers a layer at a time)
  config.remat = False  # recompute each block's activations in the backward pass (less memory)
  config.text_file = ""  # a UTF-8 file to train on; "": CPython's documentation text
  config.data = ""  # a corpus: a directory or glob of Parquet or ArrayRecord files, local or gs://
  config.tokenizer = ""  # with data: a Hugging Face tokenizer.json; "": bytes
  config.eval_fraction = 0.05  # the corpus's last part held out for eval
  config.batch_size = batch_size
  config.num_steps = num_steps
  config.optimizer = "adamw"
  config.learning_rate = learning_rate
  config.weight_decay = 0.1
  config.schedule = "warmup_cosine"
  # min(1000, num_steps // 10), as a reference that follows --config.num_steps (min(a, b) spelled
  # (a + b - |a - b|) / 2: the arithmetic a FieldReference has).
  tenth = config.get_ref("num_steps") // 10
  config.warmup_steps = (tenth + 1000 - abs(tenth - 1000)) // 2
  config.grad_clip_norm = 1.0
  config.log_every_steps = 50 if size == "tiny" else 100
  config.eval_every_steps = 150 if size == "tiny" else 2000
  config.eval_batches = 0 if size == "tiny" else 20
  config.checkpoint_every_steps = 100 if size == "tiny" else 1000  # periodic saves within the run
  return config
