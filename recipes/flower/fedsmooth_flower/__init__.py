"""A `flwr run`-able Flower app for the NLG (LLaMA) and ViT recipes."""
