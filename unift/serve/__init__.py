"""The web service: an OpenAI-compatible API under /v1 and a browser chat UI at /, on one port."""
