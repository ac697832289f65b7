"""A linear regression small enough to check by hand: w=2, b=1 fit to y = 2x + 1.5 on x=[1,2,3]
with SGD at 0.1.

The global batch of 24 is the three points eight times, so each of 8 devices sees x=[1,2,3]
and every step matches the single-device numbers worked out by hand (tests/test_seed.py).
"""

from launcher import config as launcher_config


def get_config():
  config = launcher_config.defaults()
  config.workload = "linear"
  config.batch_size = 24
  config.num_steps = 200
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.x = [1.0, 2.0, 3.0]  # the points, cycled in order
  config.true_w = 2.0  # the data: y = true_w * x + true_b
  config.true_b = 1.5  # the data's intercept
  config.init_w = 2.0  # the params' start
  config.init_b = 1.0  # the params' start
  return config
