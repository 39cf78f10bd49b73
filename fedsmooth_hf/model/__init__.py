"""Layer 2, PEFT plumbing: LoRA adapters and their factors, frozen low-rank offsets (forward hooks),
full-weight gradients, merges into (4-bit) bases, rank masks, FedProx's term, ZeRO-3 gathers."""
