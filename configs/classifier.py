"""An MLP on scikit-learn's handwritten digits: 1,497 train and 300 test images, 10 classes."""

from launcher import config as launcher_config


def get_config():
  config = launcher_config.defaults()
  config.workload = "classifier"
  config.batch_size = 128
  config.num_steps = 400
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  config.schedule = "warmup_cosine"
  config.warmup_steps = 20
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.hidden_sizes = (256, 256)  # MLP hidden layers; a tuple: --config.hidden_sizes="(512,512)"
  config.test_examples = 300  # digits held out for eval
  return config
