"""`unift eval`'s figures: perplexity against an independent computation (the model's own loss, one
example at a time, no padding), answer extractors, BLEU/ROUGE-L (character-level for Chinese), and
multiple-choice exams in the MMCU / C-Eval / CMMLU / MMLU layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from after_training_helpers import run_folder

from unift.data import IGNORE_INDEX, encode_conversation, get_template
from unift.data.answers import get_extractor
from unift.errors import UniftError
from unift.evals.exams import LETTERS, Question, conversation, load_exam, score_exam, shots_for
from unift.evals.likelihood import perplexity, score_rows
from unift.evals.text_metrics import bleu, rouge_l

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 + 2 = 4.\nAnswer: 4"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "Write a longer answer about the sea, please, with some detail."},
     {"role": "assistant", "content": "The sea is wide and deep, and its water is salty and cold."}],
]


def qa_file(folder: Path) -> Path:
    """CONVERSATIONS as an alpaca JSONL file, the held-out set `unift eval --data` reads."""
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": c[0]["content"], "input": "", "output": c[1]["content"]}) + "\n"
                            for c in CONVERSATIONS), encoding="utf-8")
    return data


def independent_nll(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed NLL of the labelled tokens from the model's own loss on this one example (no padding)."""
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    n = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    return float(loss) * n, n


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    from unift.models import load_tokenizer

    folder = tiny_model("llama")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), load_tokenizer(str(folder))


def encoded_rows(tokenizer):
    template = get_template("chatml")
    rows = []
    for c in CONVERSATIONS:
        e = encode_conversation(c, template, tokenizer, cutoff_len=512)
        rows.append((e.input_ids, e.labels))
    return rows


@pytest.mark.parametrize("peft_type,trim,budget", [(None, True, None), (None, False, None), (None, True, 1),
                                                   ("prompt", True, None)])
def test_perplexity_equals_an_independent_computation(tiny, tiny_model, peft_type, trim, budget, monkeypatch):
    """Also with the logits limited to the answer positions (trim) or not, and with a logits budget that
    allows one row per forward pass."""
    from unift.evals import likelihood

    model, tokenizer = tiny
    assert likelihood.accepts_logits_to_keep(model)
    if not trim:
        monkeypatch.setattr(likelihood, "accepts_logits_to_keep", lambda model: False)
    if budget:
        monkeypatch.setattr(likelihood, "LOGITS_BUDGET", budget)
    if peft_type:  # virtual tokens prepend positions to the logits: the scorer must read the right ones
        from peft import PromptTuningConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
        model = get_peft_model(fresh, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    rows = encoded_rows(tokenizer)
    assert len({len(r[0]) for r in rows}) == 3  # different lengths: batches carry padding
    scored = score_rows(model, rows, tokenizer.pad_token_id, batch_size=2)
    expected = [independent_nll(model, ids, labels) for ids, labels in rows]
    for got, (nll, n) in zip(scored, expected):
        assert got.tokens == n
        assert math.isclose(got.nll, nll, rel_tol=1e-4)
    ppl = perplexity(scored)
    assert math.isclose(ppl.mean_example, sum(math.exp(nll / n) for nll, n in expected) / 3, rel_tol=1e-4)
    assert math.isclose(ppl.corpus, math.exp(sum(x for x, _ in expected) / sum(n for _, n in expected)),
                        rel_tol=1e-4)
    assert ppl.mean_example != pytest.approx(ppl.corpus)  # two different figures, both reported


def test_perplexity_of_adapter_and_merged_model_agree(tiny_model, tmp_path, capsys):
    """`unift eval` on a run folder and on its merged model gives the same perplexity, and the adapter
    changes it (base row differs); results land in eval_results.json with every figure."""
    from unift.cli import main

    base = tiny_model("llama")
    run = run_folder(base, tmp_path / "run", "lora", perturb=0.05, template="chatml")
    data = qa_file(tmp_path)
    assert main(["merge", "--adapter_dir", str(run), "--merged_dir", str(tmp_path / "merged")]) == 0
    flags = ["--data", str(data), "--metrics", "ppl", "--show", "0"]
    assert main(["eval", "--adapter_dir", str(run), "--compare_base", "--num_shots", "1", "--shots_from", str(data),
                 "--plot", *flags]) == 0
    tuned = json.loads((run / "eval_results.json").read_text())
    assert (run / "eval_perplexity.png").stat().st_size > 0 and (run / "eval_perplexity_corpus.png").exists()
    assert main(["eval", "--model_name_or_path", str(tmp_path / "merged"), *flags,
                 "--output", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    out = capsys.readouterr().out
    assert "perplexity (mean of per-example)" in out and "perplexity (corpus, per token)" in out
    assert [r["label"] for r in tuned["setups"]] == ["base 0-shot", "base 1-shot", "tuned"]
    key = str(data)  # results are keyed by the --data entry as given
    base_ppl, shot_ppl, tuned_ppl = (row["tasks"][key]["perplexity"] for row in tuned["setups"])
    assert shot_ppl != pytest.approx(base_ppl, rel=1e-3)  # the solved example in context changes the scores
    merged_ppl = merged["setups"][0]["tasks"][key]["perplexity"]
    assert math.isclose(tuned_ppl, merged_ppl, rel_tol=1e-3)
    assert not math.isclose(tuned_ppl, base_ppl, rel_tol=1e-3)


def test_shown_examples_are_the_ones_evaluated(tiny_model, tmp_path, capsys):
    """--show larger than --max_samples shows the evaluated questions only (it indexed past the
    predictions when the examples were read again, uncut)."""
    from unift.cli import main

    run = run_folder(tiny_model("llama"), tmp_path / "run", "lora", perturb=0.05, template="chatml")
    data = qa_file(tmp_path)
    assert main(["eval", "--adapter_dir", str(run), "--data", str(data), "--metrics", "em", "--max_samples", "1",
                 "--show", "3", "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nQ: ") == 1 and CONVERSATIONS[0][0]["content"] in out


def test_eval_dtype_and_default_answer_length(tiny_model, tmp_path):
    """--dtype bf16 scores the model in bf16 (recorded in the results) with a perplexity close to fp32's:
    the flag reaches the loaded weights, not just the options. Without --max_new_tokens, answers may run
    to the longest reference answer and a quarter more (a fixed default cut long worked answers short)."""
    from transformers import AutoTokenizer

    from unift.cli import main

    run = run_folder(tiny_model("llama"), tmp_path / "run", "lora", perturb=0.05, template="chatml")
    data = qa_file(tmp_path)
    results = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", "--adapter_dir", str(run), "--data", str(data), "--show", "0", "--dtype", dtype,
                     "--output", str(out)]) == 0
        results[dtype] = json.loads(out.read_text())
    assert (results["fp32"]["dtype"], results["bf16"]["dtype"]) == ("fp32", "bf16")
    fp32, bf16 = (results[d]["setups"][0]["tasks"][str(data)] for d in ("fp32", "bf16"))
    assert fp32["perplexity"] != bf16["perplexity"]
    assert math.isclose(fp32["perplexity"], bf16["perplexity"], rel_tol=0.05)
    tokenizer = AutoTokenizer.from_pretrained(run)
    longest = max(len(tokenizer(c[1]["content"], add_special_tokens=False)["input_ids"]) for c in CONVERSATIONS)
    assert longest > 8 and fp32["max_new_tokens"] == longest + max(8, longest // 4)


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("answer", "so 3 + 4 = 7.\nAnswer: 7", "7"),
    ("answer", "答案：四十七", "四十七"),
    ("last_number", "We get 1,200 apples, then 7.50 more", "7.5"),
    ("last_number", "no digits here", ""),
    ("final_line", "thinking...\n\n  The Result  \n", "the result"),
    ("regex:is (\\w+)", "it is red, no, it is Blue", "blue"),
    ("exact", "  Hello   World ", "hello world"),
])
def test_answer_extractors(name, text, expected):
    assert get_extractor(name)(text) == expected


def test_bad_extractor_is_one_clear_error():
    with pytest.raises(UniftError, match="--extractor 'regex:\\(' : invalid|invalid regular expression"):
        get_extractor("regex:(")
    with pytest.raises(UniftError, match="choose one of"):
        get_extractor("first_word")


def test_bleu_and_rouge_are_character_level_for_chinese():
    # LCS of 我爱北京 and 我爱上海 is 我爱: precision = recall = 2/4, F1 = 0.5
    assert rouge_l(["我爱上海"], ["我爱北京"]) == pytest.approx(50.0)
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert rouge_l(["a b c d"], ["a x c y"]) == pytest.approx(50.0)
    assert bleu(["今天天气很好，我们去公园散步吧"], ["今天天气很好，我们去公园散步吧"]) == pytest.approx(100.0)
    partial = bleu(["今天天气很好，我们去公园散步"], ["今天天气不错，我们去公园散步吧"])
    assert 0 < partial < 100  # word-level BLEU would see one unsplit "word" per sentence and score 0
    assert bleu(["今天天气很好，我们去公园散步"], ["今天天气不错，我们去公园散步吧"], chinese=False) == 0


def write_exams(folder):
    (folder / "cmmlu").mkdir()
    (folder / "cmmlu" / "astronomy.csv").write_text(
        ",Question,A,B,C,D,Answer\n0,太阳是什么？,行星,恒星,卫星,彗星,B\n1,月球是地球的什么？,卫星,恒星,行星,星系,A\n",
        encoding="utf-8")
    (folder / "ceval_val.csv").write_text(
        "id,question,A,B,C,D,answer,explanation\n0,一加一等于几？,1,2,3,4,B,\n", encoding="utf-8")
    (folder / "math_test.csv").write_text("What is 2+2?,3,4,5,6,B\n", encoding="utf-8")
    (folder / "mmcu.json").write_text(json.dumps(
        [{"类别": "心理", "题目": "＿不是社会化的载体。", "选项": "A:家庭\nB:大学\nC:杂志\nD:意识", "答案": "D"}],
        ensure_ascii=False), encoding="utf-8")


def test_exam_layouts_load(tmp_path):
    write_exams(tmp_path)
    questions = load_exam([str(tmp_path / "cmmlu"), str(tmp_path / "ceval_val.csv"), str(tmp_path / "math_test.csv"),
                           str(tmp_path / "mmcu.json")])
    assert [(q.subject, q.answer) for q in questions] == [
        ("astronomy", "B"), ("astronomy", "A"), ("ceval", "B"), ("math", "B"), ("心理", "D")]
    assert questions[0].options == ("行星", "恒星", "卫星", "彗星")
    assert questions[-1].options == ("家庭", "大学", "杂志", "意识")


@pytest.mark.parametrize(("content", "message"), [
    (",Question,A,B,C,D,Answer\n0,Q?,a,b,c,d,E\n", "bad.csv: line 2: answer must be one of A, B, C, D, not 'E'"),
    (",Question,A,B,C,D,Answer\n0,Q?,a,,c,d,A\n", "bad.csv: line 2: a question needs four non-empty options"),
    ("Q?,a,b,c\n", "bad.csv: line 1: expected question,A,B,C,D,answer"),
])
def test_bad_exam_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UniftError) as err:
        load_exam([str(path)])
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0])) and message.split(": ", 1)[1] in str(err.value)


def test_shots_come_from_the_same_subject_and_never_the_question():
    pool = [Question("a", f"q{i}", ("1", "2", "3", "4"), "A") for i in range(3)] + [Question("b", "x", ("1", "2", "3", "4"), "B")]
    assert [s.question for s in shots_for(pool[0], pool, 3)] == ["q1", "q2", "x"]
    messages = conversation(pool[0], shots_for(pool[0], pool, 2), chinese=False)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "A" and "q0" in messages[-1]["content"]


def test_exam_picks_the_most_likely_option(tiny, tmp_path):
    """Each pick is the option whose answer the model finds most likely, computed here one option at a time."""
    model, tokenizer = tiny
    write_exams(tmp_path)
    questions = load_exam([str(tmp_path / "cmmlu"), str(tmp_path / "mmcu.json")])
    template = get_template("chatml")
    result = score_exam(model, tokenizer, template, questions, shots_pool=questions, num_shots=1, batch_size=3)
    for q, picked in zip(questions, result.predictions):
        context = conversation(q, shots_for(q, questions, 1), chinese=True)
        costs = []
        for letter in LETTERS:
            e = encode_conversation([*context, {"role": "assistant", "content": letter}], template, tokenizer, 10**9)
            last = len(e.labels) - next(i for i, t in enumerate(reversed(e.labels)) if t == IGNORE_INDEX)
            labels = [IGNORE_INDEX] * last + e.labels[last:]
            costs.append(independent_nll(model, e.input_ids, labels)[0])
        assert picked == LETTERS[costs.index(min(costs))]
    assert result.total == 3 and set(result.as_dict()["subjects"]) == {"astronomy", "心理"}


@pytest.mark.parametrize(("flags", "message"), [
    (["--exam", "missing.csv"], "unift: error: missing.csv: no such exam file or folder"),
    (["--extractor", "first_word"], "unift: error: --extractor 'first_word': choose one of"),
    (["--metrics", "f1"], "unift: error: --metrics: unknown f1; choose from em, ppl, bleu, rouge"),
])
def test_eval_bad_flags_fail_in_one_line_before_loading_a_model(capsys, flags, message):
    from unift.cli import main

    assert main(["eval", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1
