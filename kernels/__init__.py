"""fastdpo numerics: fused log-prob kernels (Triton + torch) and their naive reference."""
from . import reference
from .linear_logprob import linear_sequence_logprobs
from .logprob import BACKENDS, HAS_TRITON, DtypeError, sequence_logprobs, token_logprobs

__all__ = ["BACKENDS", "HAS_TRITON", "DtypeError", "linear_sequence_logprobs", "reference",
           "sequence_logprobs", "token_logprobs"]
