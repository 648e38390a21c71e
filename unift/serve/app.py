"""The web service (web.py / `unift serve`): one process, one port, serving the OpenAI-compatible API under
/v1 (unift.serve.api) and, unless --no_ui, the browser chat UI at / (unift.serve.ui), both driving one
Generator."""

from __future__ import annotations

import logging
import os
from typing import Any

from unift.inference.generator import Generator
from unift.inference.settings import GenerationSettings
from unift.serve.api import create_api

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(generator: Generator, settings: GenerationSettings, *, api_key: str | None = None, ui: bool = True,
               served_name: str | None = None, max_tokens_limit: int = 4096,
               max_prompt_tokens: int | None = None) -> Any:
    """The API, and the UI mounted after its routes (so /v1 never falls through to the UI)."""
    app = create_api(generator, settings, api_key=api_key, served_name=served_name,
                     max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens)
    if ui:
        from unift.serve.ui import mount_ui  # imports gradio: only when the UI is wanted

        app = mount_ui(app, app.state.service, api_key)
    return app


def serve(generator: Generator, settings: GenerationSettings, *, host: str = "127.0.0.1", port: int = 7860,
          api_key: str | None = None, ui: bool = True, served_name: str | None = None,
          max_tokens_limit: int = 4096, max_prompt_tokens: int | None = None) -> None:
    import uvicorn

    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without --api_key: anyone who can reach this port can use the model", host)
    app = create_app(generator, settings, api_key=api_key, ui=ui, served_name=served_name,
                     max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens)
    shown = f"[{host}]" if ":" in host else host
    log.info("OpenAI-compatible API at http://%s:%d/v1 (model ids: %s)%s", shown, port,
             ", ".join(app.state.service.models), f"; chat UI at http://{shown}:{port}/" if ui else "")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("UNIFT_SERVE_LOG_LEVEL", "warning"))
