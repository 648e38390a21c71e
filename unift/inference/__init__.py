"""What generate, chat, predict, eval, merge and serve share: the Generator, its batching
scheduler, and the after-training operations built on it."""
