"""Layer 3, what outlives a process: crash-safe federated checkpoints, the merged model and its card,
adapter export and the Hub upload."""
