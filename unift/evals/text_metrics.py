"""BLEU and ROUGE-L for free-form answers, through maintained libraries (sacrebleu, rouge-score).

Chinese text has no spaces between words, so both are computed on characters when the references are
mostly CJK: sacrebleu's `zh` tokenizer splits every Chinese character, and ROUGE-L gets a character
tokenizer (rouge-score's default one drops every non-ASCII character, which would score Chinese as empty).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def is_chinese(texts: Sequence[str]) -> bool:
    """More than a third of the non-space characters are CJK."""
    chars = "".join("".join(t.split()) for t in texts)
    return bool(chars) and len(CJK.findall(chars)) > len(chars) / 3


class CharTokenizer:
    """rouge-score tokenizer protocol: every non-space character is a token (lower-cased)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


def bleu(predictions: Sequence[str], references: Sequence[str], chinese: bool | None = None) -> float:
    """Corpus BLEU (0-100), sacrebleu's standard settings; character-level for Chinese."""
    import sacrebleu

    chinese = is_chinese(references) if chinese is None else chinese
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)],
                                       tokenize="zh" if chinese else "13a").score)


def rouge_l(predictions: Sequence[str], references: Sequence[str], chinese: bool | None = None) -> float:
    """Mean ROUGE-L F1 (0-100) over examples; character-level for Chinese."""
    from rouge_score import rouge_scorer

    chinese = is_chinese(references) if chinese is None else chinese
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer() if chinese else None)
    if not references:
        return float("nan")
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
    return 100 * total / len(references)
