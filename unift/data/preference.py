"""Preference records -> token ids for the preference stages (unift.train.stages), and prompt rows for GRPO.

A paired record is a conversation whose last assistant turn carries the other answer under "rejected"; an
unpaired (KTO) one carries a true/false "label" (unift.data.layouts). Both answers are rendered by the
run's template exactly as supervised answers are (unift.data.tokenize: the answer piece ends with the
template's end-of-turn, so the model learns to stop), after one shared prompt: every earlier turn,
earlier answers included, is prompt here.

--cutoff_len applies to the prompt plus the longer answer, with the supervised rules: drop/keep cut the
prompt from the front (the BOS kept); an answer that alone reaches the cutoff drops the record, or with
keep is cut at its end; split shares the cut between the prompt's start and the answers' starts.
"""

from __future__ import annotations

from unift.data.templates import Message
from unift.data.tokenize import _encode_pieces, _split_lengths, bos_to_add, segments

ANSWER_KEYS = ("rejected", "label")


def _plain(message: Message) -> Message:
    return {k: v for k, v in message.items() if k not in ANSWER_KEYS}


def _prompt_and_answer(messages: list[Message], template, tokenizer) -> tuple[list[int], list[int]]:
    pieces = _encode_pieces(segments([_plain(m) for m in messages], template, tokenizer), tokenizer)
    prompt = [i for ids, _ in pieces[:-1] for i in ids]
    return prompt, pieces[-1][0]


def _fit(prompt: list[int], answers: list[list[int]], bos: int | None, cutoff_len: int,
         truncation: str) -> tuple[list[int], list[list[int]], bool, bool]:
    """(prompt, answers, truncated, long_answer) within cutoff_len; answers all empty when dropped."""
    longest = max(len(a) for a in answers)
    if len(prompt) + longest <= cutoff_len:
        return prompt, answers, False, False
    if truncation == "split":
        keep_prompt, keep_answer = _split_lengths(len(prompt), longest, cutoff_len)
        return prompt[:keep_prompt], [a[:keep_answer] for a in answers], True, keep_answer < longest
    keep_bos = bos is not None and prompt[:1] == [bos]
    if longest + int(keep_bos) >= cutoff_len:  # the answer alone fills the cutoff: no prompt would be left
        if truncation != "keep" or len(prompt) >= cutoff_len:
            return prompt, [[] for _ in answers], False, True
        room = cutoff_len - len(prompt)
        return prompt, [a[:room] for a in answers], False, True
    tail = cutoff_len - longest - int(keep_bos)
    return ([bos] if keep_bos else []) + prompt[len(prompt) - tail:], answers, True, False


def encode_preference(messages: list[Message], template, tokenizer, cutoff_len: int,
                      truncation: str = "drop") -> dict:
    """One row: prompt_ids and chosen_ids/rejected_ids (paired) or completion_ids/label (unpaired), with the
    length, truncated, trained and long_answer columns the pipeline's reports read."""
    last = messages[-1]
    prompt, chosen = _prompt_and_answer(messages, template, tokenizer)
    answers = [chosen]
    if "rejected" in last:
        other = [*messages[:-1], {"role": last["role"], "content": last["rejected"]}]
        prompt_again, rejected = _prompt_and_answer(other, template, tokenizer)
        assert prompt_again == prompt  # pieces are encoded apart, so the prompt cannot depend on the answer
        answers.append(rejected)
    length = len(prompt) + max(len(a) for a in answers)
    prompt, answers, truncated, long_answer = _fit(prompt, answers, bos_to_add(tokenizer), cutoff_len, truncation)
    trained = sum(len(a) for a in answers) if all(answers) else 0
    row = {"prompt_ids": prompt, "length": length, "truncated": truncated, "trained": trained,
           "long_answer": long_answer}
    if "rejected" in last:
        row.update(chosen_ids=answers[0], rejected_ids=answers[1])
    else:
        row.update(completion_ids=answers[0], label=bool(last["label"]))
    return row


def encode_prompt_row(messages: list[Message], template, tokenizer, cutoff_len: int, truncation: str = "drop") -> dict:
    """One GRPO row: the prompt (every turn before the last answer) as ids and as rendered text, and the last
    answer as the reference the rewards compare with. The prompt and the reference's length must fit
    --cutoff_len, with the supervised truncation rules (the reference stands for the answer to come)."""
    prompt, answer = _prompt_and_answer(messages, template, tokenizer)
    length = len(prompt) + len(answer)
    prompt, (answer,), truncated, long_answer = _fit(prompt, [answer], bos_to_add(tokenizer), cutoff_len, truncation)
    text = template.render([_plain(m) for m in messages[:-1]], add_generation_prompt=True, tokenizer=tokenizer)
    return {"prompt": text if not truncated else tokenizer.decode(prompt), "prompt_ids": prompt,
            "reference": messages[-1]["content"], "length": length, "truncated": truncated,
            "trained": len(answer), "long_answer": long_answer}


# The row columns each kind of stage trains from (the others serve the reports)
COLUMNS = {"sft": ["input_ids", "labels"], "pairs": ["prompt_ids", "chosen_ids", "rejected_ids"],
           "unpaired": ["prompt_ids", "completion_ids", "label"], "prompts": ["prompt", "prompt_ids", "reference"]}
