"""fastdpo's trainer package: model, tokenizer, data, sampler, judge, pairs, train, evaluate, serve."""

__version__ = "0.1.0"
