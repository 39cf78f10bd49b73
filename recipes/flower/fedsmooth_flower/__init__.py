"""A `flwr run`-able Flower app for the recipes: NLG (LLaMA), ViT and LM classification."""
