"""Offline batch inference of a dataset (see `hydrax.generate` for the command and `run`).

Modules: `requests` (reading and validating a prompts file), `schedule` (the global radix tree,
batches under a KV budget, their order), `writer` (appended JSONL, resume), `packing`
(packed prefill of unique suffixes: bin packing and the packed attention op).
"""
