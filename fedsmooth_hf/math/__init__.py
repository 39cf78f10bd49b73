"""Layer 1, tensors only: factored low-rank algebra, gradient sketches, Gradient-Aligned factors,
server-optimizer steps. No ``torch.nn``, PEFT, Trainer or Flower."""
