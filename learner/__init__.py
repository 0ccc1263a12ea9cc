"""The DeepSpeed learner (no Ray here: actors/ wraps it). `from learner import Learner`."""

from learner.learner import Learner, lr_factor
from learner.packing import pack, plan_micro_batches, token_logprobs

__all__ = ["Learner", "lr_factor", "pack", "plan_micro_batches", "token_logprobs"]
