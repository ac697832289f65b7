"""Workloads shipped with the launcher, each one module chosen by `config.workload`."""
