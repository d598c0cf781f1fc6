"""Models: the policy architectures, tokenizer and chat template, and checkpoints on disk."""
