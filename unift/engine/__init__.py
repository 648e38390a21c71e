"""What generate, chat, predict, eval, merge and serve share: the inference Engine, its batching
scheduler, and the after-training operations built on it."""
