"""Generation and judging: the KV-cached sampler, judges, pair mining, evaluation, serving."""
