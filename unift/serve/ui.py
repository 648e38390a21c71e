"""The browser chat UI of the web service (gradio, mounted at / beside the API): streaming answers,
multi-turn history, decoding sliders, and the fine-tuned model or the base. gradio is imported only when
the UI is built, so the API alone (--no_ui) runs without it."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from unift.data import Message
from unift.errors import UniftError
from unift.inference.settings import QueueFull

if TYPE_CHECKING:
    from fastapi import FastAPI

    from unift.inference.generator import Generator
    from unift.serve.api import Service


TUNED, BASE = "fine-tuned", "base"


def ui_theme():
    import gradio as gr

    # System fonts only: the default theme fetches web fonts, which offline machines cannot reach.
    return gr.themes.Soft(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def model_choices(generator: Generator) -> list[str]:
    """The models the radio offers: the tuned one and, with an adapter, the base beside it."""
    if generator.has_adapter:
        return [TUNED, BASE]
    # a run trained whole (full, freeze) is the tuned model, with no base beside it
    return [TUNED] if getattr(generator, "holds_model", False) else [BASE]


def responder(service: Service) -> Callable[..., Iterator[tuple[str, list[Message], list[dict]]]]:
    """The chat callback: streams one answer into the display, then adds it to the history."""
    import gradio as gr

    generator, defaults = service.generator, service.settings

    def respond(message: str, history: list[Message], display: list[dict], model: str, temperature: float,
                top_p: float, max_new_tokens: float, repetition_penalty: float):
        message = (message or "").strip()
        if not message:
            yield "", history, display
            return
        history = [*history, {"role": "user", "content": message}]
        display = [*display, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        settings = replace(defaults, do_sample=temperature > 0, temperature=temperature or 1.0,
                           top_p=top_p or 1.0, max_new_tokens=int(max_new_tokens),
                           repetition_penalty=repetition_penalty)
        try:
            generator.acquire_slot()
        except QueueFull as err:
            raise gr.Error(str(err)) from None
        text = ""
        stream = None
        try:
            stream = generator.open_stream(history, settings, adapter=(model == TUNED),
                                           max_prompt_tokens=service.max_prompt_tokens)
            yield "", history, display
            for piece in stream:
                text += piece
                display[-1] = {"role": "assistant", "content": text.lstrip()}
                yield "", history, display
        except UniftError as err:
            raise gr.Error(str(err)) from None
        finally:
            if stream is not None:
                stream.close()  # also when the user presses Stop: frees the model at the next token
            generator.release_slot()
        history = [*history, {"role": "assistant", "content": text.strip()}]
        yield "", history, display

    return respond


def decoding_controls(service: Service, choices: list[str]) -> list[Any]:
    """The model radio and the decoding sliders (inside the Blocks being built), in respond's order."""
    import gradio as gr

    defaults = service.settings
    with gr.Accordion("Model and decoding", open=True):
        model = gr.Radio(choices, value=choices[0], label="Model", interactive=len(choices) > 1,
                         elem_id="model")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=defaults.temperature if defaults.do_sample else 0, step=0.05,
                                    label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top p")
            max_new = gr.Slider(1, service.max_tokens_limit, value=min(defaults.max_new_tokens,
                                                                        service.max_tokens_limit),
                                step=1, label="Max new tokens")
            penalty = gr.Slider(1, 2, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty")
    return [model, temperature, top_p, max_new, penalty]


def build_ui(service: Service) -> Any:
    """Chat with streaming answers, multi-turn history, a clear button, decoding sliders, base vs tuned."""
    import gradio as gr

    generator = service.generator
    respond = responder(service)
    with gr.Blocks(title=f"unift: {service.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"### unift chat: `{service.name}`" + (
            "  \nThe fine-tuned model, or the base model without the adapter." if generator.has_adapter else ""))
        history = gr.State([])
        chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot", buttons=["copy"],
                             feedback_options=None)
        with gr.Row():
            box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, scale=5,
                             elem_id="prompt", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop = gr.Button("Stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        inputs = [box, history, chatbot, *decoding_controls(service, model_choices(generator))]
        outputs = [box, history, chatbot]
        submitted = box.submit(respond, inputs, outputs)
        clicked = send.click(respond, inputs, outputs)
        stop.click(None, None, None, cancels=[submitted, clicked])
        chatbot.clear(lambda: [], None, history, cancels=[submitted, clicked])  # its own trash button
        clear.click(lambda: ("", [], []), None, outputs, cancels=[submitted, clicked])
    # UI users stream concurrently, so the scheduler can batch them with each other and with API clients
    demo.queue(max_size=generator.max_queue, default_concurrency_limit=generator.scheduler.max_batch)
    return demo


def mount_ui(app: FastAPI, service: Service, api_key: str | None = None) -> Any:
    """The app with the chat UI mounted at / (behind a login whose password is the key, if there is one)."""
    import gradio as gr

    auth = None
    if api_key:
        def auth(username: str, password: str) -> bool:  # any user name; the password is the key
            return hmac.compare_digest(password.encode(), api_key.encode())
    return gr.mount_gradio_app(app, build_ui(service), path="/", auth=auth,
                               auth_message="Enter any user name and the server's API key.",
                               theme=ui_theme(), footer_links=[], ssr_mode=False)
