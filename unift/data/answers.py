"""Answer extractors: which part of a generated answer is compared with the reference (exact match in
`unift eval`, the exact_answer reward of `--stage grpo`)."""

from __future__ import annotations

import re
from collections.abc import Callable

from unift.errors import UniftError

# The bundled sets end with an answer line: "Answer: 42" (English) or "答案：42" / "答案：四十七" (Chinese).
ANSWER = re.compile(r"(?:Answer:|答案[:：])\s*([^\s。.,，]+(?:[.,]\d+)*)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def answer_line(text: str) -> str:
    """The value after the last `Answer:` / `答案：` marker when there is one, else the whole text."""
    found = ANSWER.findall(text)
    if found:
        return found[-1].replace(",", "")
    return normalise(text)


def last_number(text: str) -> str:
    """The last number in the text (thousands separators dropped, "7.0" read as "7"), else ''."""
    found = NUMBER.findall(text)
    if not found:
        return ""
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def final_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return normalise(lines[-1]) if lines else ""


def exact(text: str) -> str:
    return normalise(text)


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "answer": answer_line, "last_number": last_number, "final_line": final_line, "exact": exact,
}


def get_extractor(name: str) -> Callable[[str], str]:
    """A named extractor, or `regex:PATTERN` (the first group of the last match, else the whole match)."""
    if name.startswith("regex:"):
        pattern = name[len("regex:"):]
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise UniftError(f"--extractor {name!r}: invalid regular expression ({err})") from None

        def by_regex(text: str) -> str:
            matches = list(compiled.finditer(text))
            if not matches:
                return ""
            last = matches[-1]
            return normalise(last.group(1) if compiled.groups else last.group(0))

        return by_regex
    if name not in EXTRACTORS:
        raise UniftError(f"--extractor {name!r}: choose one of {', '.join(EXTRACTORS)} or regex:PATTERN")
    return EXTRACTORS[name]
