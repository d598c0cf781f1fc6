"""fastdpo numerics: fused log-prob kernels (Triton + torch) and their naive reference."""
from . import reference
from .linear_logprob import linear_sequence_logprobs
from .linear_pair import linear_pair_loss
from .logprob import BACKENDS, HAS_TRITON, DtypeError, sequence_logprobs, token_logprobs

__all__ = ["BACKENDS", "HAS_TRITON", "DtypeError", "linear_pair_loss", "linear_sequence_logprobs",
           "reference", "sequence_logprobs", "token_logprobs"]
