"""First stage: the VQGAN image tokenizer."""
