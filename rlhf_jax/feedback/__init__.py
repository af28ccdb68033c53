"""Collecting human comparisons of model samples in the terminal: ``python -m rlhf_jax.feedback``."""
from rlhf_jax.feedback.collector import Sampler, Session, collect, read_prompts, undecided_path

__all__ = ["Sampler", "Session", "collect", "read_prompts", "undecided_path"]
