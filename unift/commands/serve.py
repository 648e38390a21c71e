"""`unift serve` (web.py): an OpenAI-compatible API under /v1 and a chat UI at /, on one port."""

from __future__ import annotations

from dataclasses import dataclass

from unift.commands.common import ConfigOptions, DecodingOptions, DtypeOptions, FindRunOptions, load_generator
from unift.models.flags import DataFlags, DecodingFlags
from unift.options import POSITIVE_INT, Range, like, opt


@dataclass
class ServeOptions(DecodingOptions, DtypeOptions, ConfigOptions, FindRunOptions):
    preset: str = like(DecodingFlags, "preset", "chat")  # conversations: sampled answers
    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only)", group="service")
    port: int = opt(7860, "port", group="service", range=Range(0, 65535))
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1 (and the key as the UI password)",
                              group="service", env="UNIFT_API_KEY")
    no_ui: bool = opt(False, "serve the /v1 API alone, without the chat UI at /", group="service")
    max_queue: int = opt(256, "requests admitted at once (generating + waiting); more are answered 429 with "
                         "Retry-After", group="service", range=POSITIVE_INT)
    max_batch: int = opt(32, "most requests decoded at once (others join the running batch as rows finish; "
                         "each row holds its own KV cache: lower it for a large model with long prompts)",
                         group="service", range=POSITIVE_INT)
    served_model_name: str | None = opt(None, "model id in the API (default: the run folder's name)",
                                        group="service")
    max_tokens_limit: int = opt(4096, "the largest max_tokens accepted", group="service", range=POSITIVE_INT)
    cutoff_len: int | None = like(DataFlags, "cutoff_len")


OPTIONS = ServeOptions


def run(options: ServeOptions) -> None:
    from unift.serve.app import serve

    generator = load_generator(options)
    generator.max_queue = options.max_queue
    generator.scheduler.max_batch = options.max_batch
    serve(generator, options.decoding(), host=options.host, port=options.port, api_key=options.api_key,
          ui=not options.no_ui, served_name=options.served_model_name, max_tokens_limit=options.max_tokens_limit,
          max_prompt_tokens=options.cutoff_len)
