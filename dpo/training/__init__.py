"""Training: configs, data, losses, cached reference log-probs, the shared loop, DPO and SFT."""
