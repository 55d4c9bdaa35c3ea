"""How many tokens the tiny student needs to learn tiny's Orca 2 mixture, outside the pipeline, in minutes.

The Orca 2 stage's data without the stages before it: tiny's three families from
their generators (orca_core/sources/serial.py), the oracle teacher's answers in
Orca 2's strategies (`AB>C` / `FT` step lines and "So the answer is X." on the
serial families, the bare answer on max_of_two; orca_oracle.solver.render), each
prompt rendered as the pipeline renders it (`student_chat` through the tokenizer's
ChatML template, the empty system turn included; `--template none` for the bare
question). One process trains tiny's Llama from scratch with tiny's optimizer and
rows (4 x 320 packed, position ids restarting per example, so attention stays
within an example) and scores held-out prompts greedily with transformers.

docs/RESULTS.md ("What the Orca 2 stage needs") has its figures: nothing learnt
at 700 steps, the mixture learnt at 2,100 (about 80 s and 4 min here).

    .venv/bin/python bench/orca2_mixture.py --tokenizer runs/tokenizer/<key> --steps 2100 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.json_output import print_json  # noqa: E402

FAMILIES = ("shell_game", "coin_moves", "max_of_two")
STRATEGY = {"shell_game": "step-by-step", "coin_moves": "step-by-step", "max_of_two": "direct-answer"}


def examples(family: str, options: dict, train: int, heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct questions of one family: the first `heldout` for scoring, the next `train` to learn from."""
    from orca_core.sources.serial import GENERATORS

    dataset_class, config_class = GENERATORS[family]
    dataset = dataset_class(config_class(**options, seed=seed, size=50 * (train + heldout)))
    seen, picked = set(), []
    for index in range(len(dataset)):
        entry = dataset[index]
        if entry["question"] not in seen:
            seen.add(entry["question"])
            picked.append(entry)
        if len(picked) == train + heldout:
            break
    return picked[heldout:], picked[:heldout]


def teacher_answer(family: str, entry: dict) -> str:
    """What the oracle teacher answers under the family's Orca 2 strategy (always right here)."""
    from orca_oracle.reasoning import reason, task_line
    from orca_oracle.solver import Draft, render

    row = {"id": "bench", "task_name": family, "inputs": entry["question"], "metadata": json.dumps(entry["metadata"])}
    draft = Draft(reason(row, entry["answer"]), entry["answer"], task_line(entry["question"]), (), 0)
    return render(STRATEGY[family], draft)


def measure(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from orca_core.eval.backends import chat_prompts
    from orca_core.prompts import student_chat
    from orca_core.train import IGNORE, param_groups, shifted_targets

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(entries: list[dict]) -> list[list[int]]:
        """As the pipeline's eval prompts (`chat_prompts`), or the bare question and a newline."""
        if args.template == "none":
            return tokenizer([entry["question"] + "\n" for entry in entries], add_special_tokens=False)["input_ids"]
        return chat_prompts(Path(args.tokenizer), [student_chat("", entry["question"]) for entry in entries])

    options = {"shell_game": {"cups": 5, "swaps": args.swaps}, "coin_moves": {"moves": args.moves},
               "max_of_two": {"digits": args.digits}}  # tiny's sizes by default
    train, heldout, encoded = {}, {}, {}
    for family in FAMILIES:
        train[family], heldout[family] = examples(family, options[family], args.train_per_family, args.heldout,
                                                  args.data_seed)
        encoded[family] = []
        for entry, prompt in zip(train[family], prompt_ids(train[family])):
            reply = tokenizer(teacher_answer(family, entry) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            encoded[family].append((prompt + reply, [IGNORE] * len(prompt) + reply))

    # The stream: a family at random, then the next of its shuffled pool; rows filled best-fit from a small buffer.
    rng, order, buffer = random.Random(args.seed), {f: [] for f in FAMILIES}, []

    def next_example() -> tuple[list[int], list[int]]:
        family = rng.choice(FAMILIES)
        if not order[family]:
            order[family] = list(range(len(encoded[family])))
            rng.shuffle(order[family])
        return encoded[family][order[family].pop()]

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.zeros(args.rows, args.seq, dtype=torch.long)
        labels = torch.full((args.rows, args.seq), IGNORE)
        positions = torch.zeros(args.rows, args.seq, dtype=torch.long)
        for row in range(args.rows):
            used = 0
            while True:
                while len(buffer) < 48:
                    buffer.append(next_example())
                fits = [i for i, (x, _) in enumerate(buffer) if len(x) <= args.seq - used]
                if not fits:
                    break
                x, y = buffer.pop(max(fits, key=lambda i: len(buffer[i][0])))
                ids[row, used:used + len(x)], labels[row, used:used + len(x)] = torch.tensor(x), torch.tensor(y)
                positions[row, used:used + len(x)] = torch.arange(len(x))
                used += len(x)
            positions[row, used:] = torch.arange(args.seq - used)  # padding: its own segment, no labels
        return ids, labels, positions

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=384, max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=args.lr, betas=(0.9, args.beta2))

    def lr_at(step: int) -> float:  # tiny's: 20 warmup steps, then cosine down to 10 %
        if step < 20:
            return args.lr * (step + 1) / 20
        progress = min(1.0, (step - 20) / max(1, args.steps - 21))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    started = time.perf_counter()
    for step in range(args.steps):
        ids, labels, positions = batch()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        targets = shifted_targets(labels, positions)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.rows * args.seq / (time.perf_counter() - started)
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} {rate:.0f} tok/s", file=sys.stderr)
    train_seconds = time.perf_counter() - started

    model.eval()
    accuracy, samples = {}, {}
    with torch.no_grad():
        for family, entries in heldout.items():
            by_length: dict[int, list[tuple[dict, list[int]]]] = {}
            for entry, prompt in zip(entries, prompt_ids(entries)):  # fixed-width: one batch per length, no padding
                by_length.setdefault(len(prompt), []).append((entry, prompt))
            correct = 0
            for length, pairs in by_length.items():
                group = [entry for entry, _ in pairs]
                prompts = torch.tensor([prompt for _, prompt in pairs])
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=80,
                                     do_sample=False, eos_token_id=end, pad_token_id=end)
                for entry, tokens in zip(group, out[:, length:]):
                    text = tokenizer.decode(tokens).split("<|im_end|>")[0].strip()
                    answer = text.rsplit("answer is", 1)[1].strip().rstrip(".") if "answer is" in text else text
                    correct += answer == entry["answer"]
                    samples.setdefault(family, text[:60])
            accuracy[family] = round(100 * correct / len(entries), 1)
    return {"bench": "orca2_mixture", "config": vars(args), "tokens": args.steps * args.rows * args.seq,
            "train_seconds": round(train_seconds, 1), "accuracy": accuracy,
            "macro": round(sum(accuracy.values()) / len(accuracy), 1), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="the pipeline tokenizer's folder: runs/tokenizer/<key>")
    parser.add_argument("--steps", type=int, default=2100)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=320)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta2", type=float, default=0.95)
    parser.add_argument("--train-per-family", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=150)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--moves", type=int, default=11)
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--template", choices=["chatml", "none"], default="chatml")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--data-seed", type=int, default=1000, help="the generators' seed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print_json(lambda: measure(args))


if __name__ == "__main__":
    main()
