"""tests/numbers_workload.py: 12 SGD steps of a linear regression, a report every 4."""

from launcher import config as launcher_config


def get_config():
  config = launcher_config.defaults()
  config.workload = "tests.numbers_workload"
  config.features = 4
  config.num_records = 512
  config.batch_size = 32
  config.num_steps = 12
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.schedule = "warmup_cosine"
  config.warmup_steps = 4
  config.log_every_steps = 4
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 0
  config.skip_nonfinite_steps = True
  config.nan_at_batches = (-1,)
  config.batch_seconds = 0.0
  config.eval_batch_seconds = 0.0
  return config
