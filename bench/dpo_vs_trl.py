"""unift's preference stages against plain TRL, on the same arithmetic preference pairs, scored by one scorer.

--stage dpo (default), kto or orpo. Both sides: the embedded SmolLM2-135M-Instruct in fp32, LoRA r=8 alpha 16
on every linear layer, beta 0.1, 40 steps of batch 4, lr 5e-4, the same seed, data/arith_pairs/train.jsonl
(for kto each pair is two unpaired rows, the chosen answer desirable and the rejected one not, in one
shuffled file both sides read).
- TRL: DPOTrainer, KTOTrainer or the experimental ORPOTrainer with its own tokenization (the tokenizer's
  chat template) and its own config defaults (linear schedule, no warm-up, dropout disabled, ...), given a
  PeftModel. Two settings that change only speed: no gradient checkpointing, batches padded to a multiple
  of 32 tokens where the config has the setting (as unift pads them; a CPU's matmul library builds a
  kernel for every new shape).
- unift: `unift train --stage STAGE` with its defaults and the same steps, batch, learning rate, LoRA and
  seed (--unift_args adds flags, e.g. to bisect: --unift_args="--lr_scheduler_type cosine").
- The same batches (dpo): TRL trains unift's training rows in unift's order (what unift's data pipeline
  keeps and shuffles for that seed; the two Trainers' samplers, seeded alike, then draw the same batches, as
  tests/test_dpo_vs_trl.py checks step by step), so a round differs only in the LoRA start's random draw.
  --own_order gives TRL the file's order and rows instead. kto: one shuffled file, read in order by both;
  orpo: each tool its own order (TRL's experimental ORPOTrainer names its tokenized columns otherwise).
Scoring (one scorer for the base and both adapters, on data/arith_pairs/test.jsonl): the summed
log-probability of the chosen answer minus the rejected one after the same prompt, in fp32; preference
accuracy is how often that margin is positive. Each pair is rendered twice, by the tokenizer's chat template
(TRL's rendering) and by unift's template (unift.data.preference, what `unift eval --pairs` scores); where
the two give the same token ids, the margins are the same and are computed once. "gain" is the margin
minus the base's: what training added (the implicit reward margin of DPO, in nats, with the base as the
reference); the last lines give unift's gain over TRL's, per round and the median.
Rounds run the contenders interleaved (one seed per round); every round is printed, then the medians.

    python bench/dpo_vs_trl.py [--stage dpo|kto|orpo] [--rounds 3] [--steps 40] [--unift_args "..."] [--own_order]
                               [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, measured_run, median, read_records, run_round  # noqa: E402
from fair import versions  # noqa: E402

PAIRS = REPO / "data" / "arith_pairs"
BATCH, LR, BETA, RANK, ALPHA = 4, 5e-4, 0.1, 8, 16
TRAINERS = {"dpo": "DPOTrainer", "kto": "KTOTrainer", "orpo": "ORPOTrainer"}
TRL, UNIFT = "TRL (its defaults)", "unift train"


def model_path(given: str | None) -> str:
    from unift.models import embedded_model_dir

    return given or str(embedded_model_dir())


def unpaired_file(folder: Path, seed: int) -> Path:
    """KTO's rows: each pair as two unpaired answers (chosen desirable, rejected not), shuffled once."""
    import random

    rows = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for r in read_records(PAIRS / "train.jsonl") for key in ("chosen", "rejected")]
    random.Random(seed).shuffle(rows)
    path = folder / f"kto_{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def unift_rows(unift_argv: list[str]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt ids, chosen ids) of the rows `unift train unift_argv` trains, in its order (before sampling)."""
    from unift.cli import options_and_run, parse
    from unift.train.prepared import prepare

    options, _ = options_and_run(parse(["train", *unift_argv]))
    return [(tuple(r["prompt_ids"]), tuple(r["chosen_ids"])) for r in prepare(options).train]


def in_unift_order(dataset, order: list[tuple[tuple[int, ...], tuple[int, ...]]]):
    """TRL's tokenized rows, those unift trains only, in unift's order; fails if the token ids differ."""
    position = {row: i for i, row in enumerate(order)}
    rows = [(tuple(r["prompt_ids"]), tuple(r["chosen_ids"])) for r in dataset]
    missing = set(order) - set(rows)
    if missing:
        raise SystemExit(f"{len(missing)} of unift's rows are not among TRL's (another rendering): no shared order")
    keep = [i for i in range(len(rows)) if rows[i] in position]
    return dataset.select(sorted(keep, key=lambda i: position[rows[i]]))


def trl_child(model_dir: str, out: Path, seed: int, steps: int, stage: str, kto_rows: Path | None,
              unift_argv: list[str] | None) -> None:
    """Plain TRL, in this (child) process: its tokenization, its config defaults, a PeftModel; with
    unift_argv, unift's training rows in unift's order."""
    import dataclasses

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    if stage == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
                for r in read_records(kto_rows)]
    else:
        if stage == "orpo":
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Trainer
        else:
            from trl import DPOConfig as Config
            from trl import DPOTrainer as Trainer
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in read_records(PAIRS / "train.jsonl")]
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    speed = {"pad_to_multiple_of": 32} if "pad_to_multiple_of" in {f.name for f in dataclasses.fields(Config)} else {}
    config = Config(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                    beta=BETA, bf16=False, use_cpu=True, seed=seed, report_to="none", save_strategy="no",
                    logging_steps=5, gradient_checkpointing=False, **speed)
    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(model_dir))
    if unift_argv is not None:
        trainer.train_dataset = in_unift_order(trainer.train_dataset, unift_rows(unift_argv))
        print(f"TRL trains unift's {len(trainer.train_dataset)} rows in unift's order", flush=True)
    trainer.train()
    model.save_pretrained(out, selected_adapters=["default"])
    (out / "log.json").write_text(json.dumps(trainer.state.log_history))


def train_trl(model_dir: str, out: Path, seed: int, steps: int, stage: str, kto_rows: Path | None,
              unift_argv: list[str] | None) -> dict:
    order = ["--unift_argv", shlex.join(unift_argv)] if unift_argv is not None else []
    out_text, _ = measured_run(sys.executable, __file__, [
        "--trl_child", str(out), "--model", model_dir, "--seed", str(seed), "--steps", str(steps), "--stage", stage,
        *(["--kto_rows", str(kto_rows)] if kto_rows else []), *order], env={"HF_HUB_OFFLINE": "1"})
    shared = [line for line in out_text.splitlines() if line.startswith("TRL trains unift's")]
    return {"adapter": str(out), "seed": seed, "order": shared[-1] if shared else "its own"}


def unift_argv(model_dir: str, seed: int, steps: int, stage: str, kto_rows: Path | None,
               extra: list[str]) -> list[str]:
    """`unift train`'s flags for a round, all but --output_dir (each run's own)."""
    data = ["--data", str(kto_rows)] if kto_rows else ["--data", "arith_pairs", "--dataset_dir", str(REPO / "data")]
    return ["--stage", stage, "--model_name_or_path", model_dir, *data, "--max_steps", str(steps),
            "--per_gpu_train_batch_size", str(BATCH), "--learning_rate", str(LR), "--pref_beta", str(BETA),
            "--lora_r", str(RANK), "--lora_alpha", str(ALPHA), "--compute_dtype", "fp32", "--seed", str(seed),
            "--logging_steps", "5", "--save_steps", "100000", "--save_total_limit", "1", *extra]


def train_unift(argv: list[str], out: Path, seed: int) -> dict:
    measured_run(sys.executable, str(REPO / "uniform_finetune.py"), [*argv, "--output_dir", str(out)],
                 env={"HF_HUB_OFFLINE": "1"})
    return {"adapter": str(out), "seed": seed}


def renderings(tokenizer) -> dict[str, list[tuple[list[int], list[int], list[int]]]]:
    """(prompt, chosen, rejected) ids of every test pair, by the chat template and by unift's template."""
    from unift.data import resolve_template
    from unift.data.preference import encode_preference

    def chat(messages: list[dict]) -> list[int]:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             add_generation_prompt=messages[-1]["role"] == "user")["input_ids"]

    template = resolve_template(None, "auto", tokenizer)  # the llama family's default: the tokenizer's own
    out: dict[str, list] = {"chat template": [], "unift template": []}
    for r in read_records(PAIRS / "test.jsonl"):
        prompt = [{"role": "user", "content": r["prompt"]}]
        head = chat(prompt)
        chosen, rejected = (chat(prompt + [{"role": "assistant", "content": r[k]}]) for k in ("chosen", "rejected"))
        assert chosen[:len(head)] == head == rejected[:len(head)]
        out["chat template"].append((head, chosen[len(head):], rejected[len(head):]))
        row = encode_preference([*prompt, {"role": "assistant", "content": r["chosen"], "rejected": r["rejected"]}],
                                template, tokenizer, cutoff_len=10**9)
        out["unift template"].append((row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]))
    return out


def margins(model, pairs, pad_id: int) -> list[float]:
    from unift.data import IGNORE_INDEX
    from unift.evals.likelihood import score_rows

    rows = [(p + a, [IGNORE_INDEX] * len(p) + a) for p, c, r in pairs for a in (c, r)]
    scored = score_rows(model, rows, pad_id, batch_size=8)
    return [rejected.nll - chosen.nll for chosen, rejected in zip(scored[0::2], scored[1::2])]


def score(path: str, adapters: dict[str, str | None]) -> dict[str, dict[str, dict]]:
    """{name: {rendering: {accuracy, margin}}} for the base (None) and each adapter folder, one scorer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    rendered = renderings(tokenizer)
    same = rendered["chat template"] == rendered["unift template"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results: dict[str, dict[str, dict]] = {}
    for name, folder in adapters.items():
        model = base if folder is None else PeftModel.from_pretrained(base, folder).eval()
        results[name] = {}
        for kind, pairs in rendered.items():
            if same and kind == "unift template":
                results[name][kind] = results[name]["chat template"]
                continue
            m = margins(model, pairs, tokenizer.pad_token_id)
            results[name][kind] = {"accuracy": sum(x > 0 for x in m) / len(m), "margin": sum(m) / len(m)}
        if folder is not None:
            base = model.unload()
    results["renderings identical"] = same  # type: ignore[assignment]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=tuple(TRAINERS), default="dpo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=42, help="round r uses seed + r")
    parser.add_argument("--unift_args", default="", help="extra `unift train` flags (one string)")
    parser.add_argument("--model", help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trl_child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--own_order", action="store_true",
                        help="dpo: TRL trains the file's rows in its own order, not unift's rows in unift's")
    parser.add_argument("--kto_rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--unift_argv", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    model = model_path(ns.model)
    if ns.trl_child:
        order = shlex.split(ns.unift_argv) if ns.unift_argv is not None else None
        return trl_child(model, ns.trl_child, ns.seed, ns.steps, ns.stage, ns.kto_rows, order)
    extra = shlex.split(ns.unift_args)
    print(f"{ns.stage.upper()} on arith_pairs, TRL {TRAINERS[ns.stage]} vs unift --stage {ns.stage}: {Path(model).name} fp32, LoRA r={RANK} alpha {ALPHA} all linear, {ns.steps} steps, "
          f"batch {BATCH}, lr {LR}, beta {BETA}; unift extra flags: {' '.join(extra) or 'none'}; "
          f"batches: {'each tool its own' if ns.stage == 'orpo' or ns.own_order and ns.stage == 'dpo' else 'the same on both sides'}; {machine()}; "
          f"{date.today()}\n{versions(sys.executable)}\n", flush=True)
    runs: dict[str, list[dict]] = {TRL: [], UNIFT: []}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for round_ in range(ns.rounds):
            seed = ns.seed + round_
            kto_rows = unpaired_file(folder, seed) if ns.stage == "kto" else None
            argv = unift_argv(model, seed, ns.steps, ns.stage, kto_rows, extra)
            order = argv if ns.stage == "dpo" and not ns.own_order else None
            jobs = {TRL: lambda out, s=seed, k=kto_rows, o=order: train_trl(model, out, s, ns.steps, ns.stage, k, o),
                    UNIFT: lambda out, s=seed, a=argv: train_unift(a, out, s)}
            run_round(jobs, runs, round_, ns.rounds, folder)
            scored = score(model, {"base": None, **{name: runs[name][-1]["adapter"] for name in runs}})
            rows.append({"round": round_ + 1, "seed": seed, **scored})
            print_table(rows, final=round_ + 1 == ns.rounds)
            if ns.json:  # after every round: a run cut short keeps what it measured
                ns.json.write_text(json.dumps({"stage": ns.stage, "unift_args": extra, "rounds": rows}, indent=2))


def gain(row: dict, name: str, kind: str = "chat template") -> float:
    return row[name][kind]["margin"] - row["base"][kind]["margin"]


def print_table(rows: list[dict], final: bool) -> None:
    kinds = ("chat template", "unift template")
    names = ("base", TRL, UNIFT)
    print(f"{'round':>5} {'seed':>4}  {'model':<20} " + "  ".join(f"{k + ' acc / margin / gain':>36}" for k in kinds))
    for row in rows if final else rows[-1:]:
        for name in names:
            cells = "  ".join(f"{row[name][k]['accuracy']:>18.0%} / {row[name][k]['margin']:+7.2f} / "
                              f"{gain(row, name, k):+6.2f}" for k in kinds)
            print(f"{row['round']:>5} {row['seed']:>4}  {name:<20} {cells}")
    if final:
        for name in names:
            cells = "  ".join(f"{median([r[name][k]['accuracy'] for r in rows]):>18.0%} / "
                              f"{median([r[name][k]['margin'] for r in rows]):+7.2f} / "
                              f"{median([gain(r, name, k) for r in rows]):+6.2f}" for k in kinds)
            print(f"{'median':>10}  {name:<20} {cells}")
        ratios = [gain(r, UNIFT) / gain(r, TRL) for r in rows]
        print(f"unift's gain / TRL's, per round: {', '.join(f'{x:.2f}' for x in ratios)}; of the medians: "
              f"{median([gain(r, UNIFT) for r in rows]) / median([gain(r, TRL) for r in rows]):.2f}")
        print(f"renderings token-identical in every round: {all(r['renderings identical'] for r in rows)}")
    print(flush=True)


if __name__ == "__main__":
    main()
