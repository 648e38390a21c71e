"""Terminal chat (server.py / `unift chat`, and `unift generate` without --prompt): the interactive loop in
a pseudo-terminal, piped input, history fed back, and streams that stop free the model."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import subprocess
import termios
import time

import pytest
from after_training_helpers import PYTHON, REPO, env, run_folder, trained_run

from unift.inference.chat import chat_loop
from unift.inference.settings import GenerationSettings


@pytest.fixture(scope="module")
def run(tiny_model):
    return trained_run(tiny_model("llama"))


@pytest.fixture(scope="module")
def generator(run):
    from unift.inference.generator import Generator

    return Generator.load(str(run))


# ---- streaming frees the model -----------------------------------------------------------------------

def test_stop_string_ends_generation_early(generator):
    messages = [{"role": "user", "content": "What is 3 plus 3?"}]
    free = "".join(generator.stream(messages, GenerationSettings(max_new_tokens=12)))
    stop = free.strip()[3:6]  # some text the model does produce, a few tokens in
    assert stop and len(free) > 10
    stream = generator.open_stream(messages, GenerationSettings(max_new_tokens=400, stop=(stop,)))
    text = "".join(stream)
    assert stop not in text and free.startswith(text)
    assert stream.finish_reason == "stop"
    # The criterion ends the model within a token or two of the stop, not at max_new_tokens.
    assert stream.completion_tokens <= 12, stream.completion_tokens
    assert not generator.lock.locked()


def test_closing_a_stream_stops_the_model(generator):
    stream = generator.open_stream([{"role": "user", "content": "Tell a long story."}],
                                   GenerationSettings(max_new_tokens=2000))
    next(stream)
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 5
    assert not generator.lock.locked() and stream.completion_tokens < 2000


# ---- the loop, with a stand-in generator ---------------------------------------------------------------

class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class EchoGenerator:
    """Answers 'answer N' and records every conversation it was given."""

    name, has_adapter = "fake", True

    def __init__(self) -> None:
        self.seen: list[tuple[list, bool | None]] = []

    def open_stream(self, messages, settings, adapter=None):
        self.seen.append(([dict(m) for m in messages], adapter))
        return FakeStream([" answer", f" {len(self.seen)}"])


class FakeStream(list):
    def close(self) -> None:
        pass


def test_history_is_fed_back_and_reset_forgets_it(monkeypatch):
    lines = iter(["hello", "/help", "and then?", "/base", "third", "/reset", "fresh", "/nope", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    generator, out = EchoGenerator(), io.StringIO()
    chat_loop(generator, GenerationSettings(), system="Be kind.", stdin=FakeTTY(), out=out)
    first, second, third, fresh = (m for m, _ in generator.seen)
    assert first == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"}]
    assert second[1:] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "answer 1"},
                          {"role": "user", "content": "and then?"}]
    assert len(third) == 6 and [a for _, a in generator.seen] == [True, True, False, False]
    assert fresh == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "fresh"}]
    text = out.getvalue()
    assert "commands:" in text and "(conversation cleared)" in text and "unknown command /nope" in text
    assert "Bot> answer 1\n" in text  # the leading space of the first piece is dropped


def test_base_switch_changes_the_answer_of_an_adapter_that_changes_it(monkeypatch, tiny_model, tmp_path):
    from unift.inference.generator import Generator

    generator = Generator.load(str(run_folder(tiny_model("llama"), tmp_path / "run", "lora")))
    settings = GenerationSettings(max_new_tokens=6)
    question = [{"role": "user", "content": "What is 2 plus 3?"}]
    tuned, base = (generator.generate([question], settings, adapter=a)[0].text for a in (True, False))
    assert tuned != base
    lines = iter(["What is 2 plus 3?", "/reset", "/base", "What is 2 plus 3?", "/reset", "/tuned",
                  "What is 2 plus 3?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = io.StringIO()
    chat_loop(generator, settings, stdin=FakeTTY(), out=out)
    answers = [line.removeprefix("Bot> ").strip() for line in out.getvalue().splitlines() if line.startswith("Bot> ")]
    assert answers == [tuned, base, tuned]


# ---- the real command in a pseudo-terminal ---------------------------------------------------------------

def _as_launched_in_background() -> None:
    """The child's set-up: the pty as its controlling terminal, and SIGINT ignored, as a background job of a
    non-interactive shell (or nohup, or some CI runners) starts it. Python then installs no handler of its
    own; whether a test process passed SIG_IGN on used to depend on what ran before, hence the flakiness."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Terminal:
    """A child process on a pseudo-terminal (its controlling tty, so ^C reaches it as SIGINT)."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env={**env(), "TERM": "dumb"},
            start_new_session=True, preexec_fn=_as_launched_in_background)
        os.close(slave)
        self.buffer = ""

    def expect(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.buffer)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.buffer[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.buffer += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    if self.proc.poll() is not None:
                        raise AssertionError(f"exited before {pattern!r}:\n{self.buffer[-2000:]}") from None
        matched = self.buffer[: found.end()]
        self.buffer = self.buffer[found.end():]
        return matched

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_chat_in_a_pseudo_terminal(run):
    # An answer far longer than the time ^C takes to arrive: it cannot end on its own before the signal does.
    term = Terminal([PYTHON, "server.py", "--lora_dir", str(run), "--model_type", "llama", "--size", "7b",
                     "--preset", "greedy", "--max_new_tokens", "3000"])
    try:
        term.expect(r"Chatting with run\. .*/reset")
        term.expect(r"You> ")
        term.send("What is 2 plus 2?\r")
        term.expect(r"Bot> \S")
        term.send("\x03")  # the first answer too would run to 3000 tokens
        term.expect(r"\[stopped\]\r?\n")
        term.expect(r"You> ")
        term.send("/help\r")
        term.expect(r"/base and /tuned")
        term.send("/reset\r")
        term.expect(r"\(conversation cleared\)")
        term.expect(r"You> ")
        # Ctrl-C in the middle of a long answer stops it and returns to the prompt.
        term.send("Tell me a long story.\r")
        term.expect(r"Bot> \S")
        term.send("\x03")
        stopped = term.expect(r"\[stopped\]")
        assert len(stopped) < 3000  # cut short, not run to --max_new_tokens
        term.expect(r"You> ")
        term.send("/exit\r")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_piped_prompt_is_answered_once(run):
    """`echo question | generate.py --lora_dir run`: one answer on stdout, no prompt, exit 0."""
    proc = subprocess.run([PYTHON, "generate.py", "--lora_dir", str(run), "--max_new_tokens", "5"],
                          input="What is 1 plus 1?\n", capture_output=True, text=True, env=env(), cwd=REPO,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() and "You>" not in proc.stdout and proc.stdout.count("\n") == 1
