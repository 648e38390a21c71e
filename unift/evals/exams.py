"""Multiple-choice exams in the MMCU / C-Eval / CMMLU / MMLU layouts, scored by the log-likelihood of each
option, zero-shot or with k solved examples in context.

Layouts read (one subject per file unless the records name it):
- CMMLU CSV: header `,Question,A,B,C,D,Answer`;  C-Eval CSV: `id,question,A,B,C,D,answer[,explanation]`
- MMLU CSV: no header, six columns `question,A,B,C,D,answer`
- MMCU JSON: a list of {"类别": subject, "题目": question, "选项": "A:...\nB:...", "答案": "D"}
- JSON/JSONL records {"question", "A".."D" (or "options": [...] / {"A": ...}), "answer"[, "subject"]}
The subject of a file is its name without a `_test` / `_dev` / `_val` suffix; a folder reads every file in it.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unift.data import Message, encode_conversation
from unift.errors import UniftError
from unift.evals.likelihood import last_answer_labels, score_rows
from unift.evals.text_metrics import is_chinese

LETTERS = "ABCD"
SPLIT_SUFFIX = re.compile(r"_(test|dev|val|train)$")
OPTION_LINE = re.compile(r"^\s*([A-D])\s*[:：.、．]\s*(.*)$")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    options: tuple[str, ...]
    answer: str  # one of LETTERS
    where: str = ""  # file and record, for messages


def _subject_of(path: Path) -> str:
    return SPLIT_SUFFIX.sub("", path.stem)


def _check(q: Question) -> Question:
    if len(q.options) != 4 or not all(o.strip() for o in q.options):
        raise UniftError(f"{q.where}: a question needs four non-empty options A-D")
    if q.answer not in LETTERS:
        raise UniftError(f"{q.where}: answer must be one of A, B, C, D, not {q.answer!r}")
    if not q.question.strip():
        raise UniftError(f"{q.where}: empty question")
    return q


def _from_csv(path: Path) -> list[Question]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    subject = _subject_of(path)
    questions = []
    if "question" in header and "answer" in header and all(x.lower() in header for x in LETTERS):
        col = {name: header.index(name) for name in ("question", "answer", *[x.lower() for x in LETTERS])}
        for n, row in enumerate(rows[1:], start=2):
            where = f"{path}: line {n}"
            if len(row) < len(header):
                raise UniftError(f"{where}: {len(row)} columns, the header has {len(header)}")
            questions.append(_check(Question(subject, row[col["question"]], tuple(row[col[x.lower()]] for x in LETTERS),
                                             row[col["answer"]].strip().upper(), where)))
        return questions
    for n, row in enumerate(rows, start=1):  # MMLU: no header
        where = f"{path}: line {n}"
        if len(row) != 6:
            raise UniftError(f"{where}: expected question,A,B,C,D,answer (6 columns) or a header naming them, "
                             f"got {len(row)} columns")
        questions.append(_check(Question(subject, row[0], tuple(row[1:5]), row[5].strip().upper(), where)))
    return questions


def _options(record: dict, where: str) -> tuple[str, ...]:
    if all(x in record for x in LETTERS):
        return tuple(str(record[x]) for x in LETTERS)
    raw = record.get("options", record.get("choices", record.get("选项")))
    if isinstance(raw, list):
        return tuple(str(o) for o in raw)
    if isinstance(raw, dict):
        return tuple(str(raw.get(x, "")) for x in LETTERS)
    if isinstance(raw, str):  # MMCU: "A:家庭\nB:大学\nC:杂志\nD:意识"
        found = {}
        for line in raw.splitlines():
            match = OPTION_LINE.match(line)
            if match:
                found[match.group(1)] = match.group(2)
        return tuple(found.get(x, "") for x in LETTERS)
    raise UniftError(f"{where}: no options (fields A-D, 'options', 'choices' or '选项')")


def _from_json(path: Path) -> list[Question]:
    text = path.read_text(encoding="utf-8")
    try:
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(text))
    except json.JSONDecodeError as err:
        raise UniftError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    if isinstance(records, dict):
        records = [records]
    questions = []
    for n, record in enumerate(records):
        where = f"{path}: record {n}"
        if not isinstance(record, dict):
            raise UniftError(f"{where}: expected an object")
        question = record.get("question", record.get("题目"))
        answer = record.get("answer", record.get("答案"))
        if question is None or answer is None:
            raise UniftError(f"{where}: needs 'question' and 'answer' (or MMCU's '题目' and '答案')")
        subject = str(record.get("subject", record.get("类别", _subject_of(path))))
        questions.append(_check(Question(subject, str(question), _options(record, where),
                                         str(answer).strip().upper(), where)))
    return questions


def load_exam(paths: Sequence[str]) -> list[Question]:
    """Questions from files or folders of files, in order."""
    questions: list[Question] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".json", ".jsonl"))
            if not files:
                raise UniftError(f"{path}: no .csv/.json/.jsonl exam files in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise UniftError(f"{path}: no such exam file or folder")
        for file in files:
            if file.suffix == ".csv":
                questions += _from_csv(file)
            elif file.suffix in (".json", ".jsonl"):
                questions += _from_json(file)
            else:
                raise UniftError(f"{file}: exams are read from .csv, .json or .jsonl files")
    if not questions:
        raise UniftError(f"{', '.join(paths)}: no questions")
    return questions


def question_text(q: Question, chinese: bool) -> str:
    options = "\n".join(f"{x}. {o}" for x, o in zip(LETTERS, q.options))
    if chinese:
        return f"以下是关于{q.subject}的单项选择题，请直接给出正确答案的选项。\n\n{q.question}\n{options}\n答案："
    return (f"The following is a multiple choice question about {q.subject.replace('_', ' ')}. Answer with the "
            f"letter of the correct option.\n\n{q.question}\n{options}\nAnswer:")


def shots_for(q: Question, pool: Sequence[Question], k: int) -> list[Question]:
    """k solved questions of the same subject (any subject when it has too few), never q itself."""
    same = [p for p in pool if p.subject == q.subject and p != q]
    other = [p for p in pool if p.subject != q.subject and p != q]
    return (same + other)[:k]


def conversation(q: Question, shots: Sequence[Question], chinese: bool) -> list[Message]:
    """Solved examples as earlier turns, then the question; the assistant's answer is filled per option."""
    messages: list[Message] = []
    for s in shots:
        messages += [{"role": "user", "content": question_text(s, chinese)},
                     {"role": "assistant", "content": s.answer}]
    messages.append({"role": "user", "content": question_text(q, chinese)})
    return messages


@dataclass
class ExamResult:
    correct: int = 0
    total: int = 0
    subjects: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    predictions: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "subjects": {s: {"accuracy": c / t if t else 0.0, "correct": c, "total": t}
                             for s, (c, t) in sorted(self.subjects.items())}}


def score_exam(model, tokenizer, template, questions: Sequence[Question], *, shots_pool: Sequence[Question] = (),
               num_shots: int = 0, batch_size: int = 8, choice: str = "letter", max_len: int = 2048) -> ExamResult:
    """Pick, for each question, the option whose answer tokens are most likely (letters: summed NLL of
    the letter; option texts: mean NLL per token, so long options are not penalised)."""
    chinese = is_chinese([q.question for q in questions])
    rows = []
    for q in questions:
        context = conversation(q, shots_for(q, shots_pool, num_shots) if num_shots else [], chinese)
        for letter, text in zip(LETTERS, q.options):
            answer = letter if choice == "letter" else text
            encoded = encode_conversation([*context, {"role": "assistant", "content": answer}], template, tokenizer,
                                          cutoff_len=10**9)
            rows.append((encoded.input_ids, last_answer_labels(encoded.labels)))
    scored = score_rows(model, rows, tokenizer.pad_token_id, batch_size, max_len)
    result = ExamResult()
    for i, q in enumerate(questions):
        options = scored[i * 4:(i + 1) * 4]
        cost = [s.nll if choice == "letter" else s.mean_nll for s in options]
        picked = LETTERS[min(range(4), key=cost.__getitem__)]
        result.predictions.append(picked)
        ok = picked == q.answer
        result.correct += ok
        result.total += 1
        result.subjects[q.subject][0] += ok
        result.subjects[q.subject][1] += 1
    return result

