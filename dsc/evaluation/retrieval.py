"""``dsc eval retrieval``: passkey and line retrieval under each attention policy.

Tasks are generated deterministically from a seed:
- ``passkey``: a 5-digit pass key sentence hidden at a controlled depth of evaluation-essay text;
- ``lines``: many lines ``line <name>: REGISTER_CONTENT is <n>``, then a question about the line at that depth.

Each case is a *context* (haystack with the needle), then a *question* whose answer is the number. The context is
prefilled densely once; under each policy the question is fed through sparse decode steps and the answer is
generated greedily (so every answer token comes from sparse attention), from a copy of the same prefilled cache.
Measures per case and policy:
- ``correct``: the first number in the generated text equals the answer;
- ``logprob``: teacher-forced log-probability of the answer tokens (question + answer fed under the policy);
- ``agree``: share of generated tokens equal to dense's at the same position.
The last two do not need the model to be good at the task (the embedded 135M model is weak at retrieval).

``--generate`` also answers each case the way a user would: ``model.generate`` on the model compiled with
``torch.compile(backend="dsparse")`` (the real rewrite and kernels; the whole prompt is prefilled densely, then the
answer is decoded sparsely), next to ``model.generate`` on the plain model (:func:`generate_rows`).
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
        "mellow", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy", "urban", "vivid", "windy", "young")
_NOUN = ("anchor", "badger", "canyon", "dagger", "ember", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchid", "pepper", "quartz", "river", "saddle", "tunnel",
         "valley", "walnut", "yonder", "zephyr")


@dataclass
class Case:
    task: str
    length: int        # target context length in tokens
    depth: float       # where the needle sits in the context (0 = start, 1 = end)
    seed: int
    context: str
    question: str
    answer: str


def _haystack_ids(tokenizer):
    from dsc.assets import essay_text

    return tokenizer(essay_text("evaluation"), add_special_tokens=False).input_ids


def passkey_case(tokenizer, length: int, depth: float, seed: int, hay=None) -> Case:
    """A pass key hidden at ``depth`` of about ``length`` tokens of evaluation-essay text."""
    rng = random.Random(f"passkey/{length}/{depth}/{seed}")
    key = str(rng.randint(10000, 99999))
    intro = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the pass key.\n\n")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    hay = hay if hay is not None else _haystack_ids(tokenizer)
    n = max(0, length - len(tokenizer(intro + needle, add_special_tokens=False).input_ids) - 20)
    start = rng.randrange(0, max(1, len(hay) - n))
    body = hay[start:start + n]
    cut = int(round(depth * len(body)))
    context = intro + tokenizer.decode(body[:cut]) + needle + tokenizer.decode(body[cut:])
    return Case("passkey", length, depth, seed, context, "\n\nWhat is the pass key? The pass key is", " " + key)


def lines_case(tokenizer, length: int, depth: float, seed: int) -> Case:
    """``line <name>: REGISTER_CONTENT is <n>`` lines filling about ``length`` tokens; asks about the line at
    ``depth``."""
    rng = random.Random(f"lines/{length}/{depth}/{seed}")
    names = [f"{a}-{b}" for a in _ADJ for b in _NOUN]
    rng.shuffle(names)
    intro = "Below is a record of lines I want you to remember. Each line has a name and a value.\n"
    values = [rng.randint(10000, 99999) for _ in names]
    lines = [f"line {n}: REGISTER_CONTENT is <{v}>\n" for n, v in zip(names, values)]
    sizes = [len(x) for x in tokenizer(lines, add_special_tokens=False).input_ids]
    room = length - 40 - len(tokenizer(intro, add_special_tokens=False).input_ids)  # 40: question + margin
    count, used = 0, 0
    while count < len(lines) and used + sizes[count] <= room:
        used += sizes[count]
        count += 1
    count = max(2, count)
    lines = lines[:count]
    pick = min(count - 1, int(depth * count))
    question = (f"\nWhat is the REGISTER_CONTENT in line {names[pick]}? I need the number.\n"
                f"The REGISTER_CONTENT in line {names[pick]} is <")
    return Case("lines", length, depth, seed, intro + "".join(lines), question, str(values[pick]))


def make_cases(tokenizer, tasks, lengths, depths, samples: int, seed: int) -> list[Case]:
    hay = _haystack_ids(tokenizer) if "passkey" in tasks else None
    out = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for i in range(samples):
                    s = seed * 1000 + i
                    out.append(passkey_case(tokenizer, length, depth, s, hay) if task == "passkey"
                               else lines_case(tokenizer, length, depth, s))
    return out


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def run_case(model, tokenizer, case: Case, policies, max_new: int = 8, chunk: int = 256) -> list[dict]:
    """Dense prefill of the context once; then, per policy, the question + greedy answer and the teacher-forced
    answer log-probability, each from that same cache (cropped back after every policy)."""
    import torch

    from dsc.evaluation.policies import apply_policy
    from dsc.generation import make_cache

    ctx = tokenizer(case.context, return_tensors="pt").input_ids
    qa = tokenizer(case.question + case.answer, add_special_tokens=False, return_tensors="pt").input_ids
    qn = len(tokenizer(case.question, add_special_tokens=False).input_ids)
    if not torch.equal(qa[0, :qn], tokenizer(case.question, add_special_tokens=False,
                                             return_tensors="pt").input_ids[0]):
        qn = qa.shape[1] - len(tokenizer(case.answer, add_special_tokens=False).input_ids)
    p = ctx.shape[1]
    cache = make_cache(model, "dynamic", 0)
    rows = []
    with torch.no_grad():
        model(input_ids=ctx, cache=cache, use_cache=True, cache_position=torch.arange(p))
        dense_tokens = None
        for pol in policies:
            with apply_policy(model, pol, prefill=p, chunk=chunk):
                # teacher-forced: question + answer as decode rows (each row selects over its own prefix)
                pos = torch.arange(p, p + qa.shape[1])
                lg = model(input_ids=qa, cache=cache, use_cache=True, cache_position=pos).logits[0].float()
                _rewind(cache, p)
                lp = torch.log_softmax(lg[qn - 1:-1], -1).gather(-1, qa[0, qn:, None]).sum().item()
                # generation: question, then greedy steps
                q = qa[:, :qn]
                lg = model(input_ids=q, cache=cache, use_cache=True,
                           cache_position=torch.arange(p, p + qn)).logits[0, -1]
                toks = []
                for i in range(max_new):
                    t = int(lg.argmax())
                    toks.append(t)
                    if t == tokenizer.eos_token_id or i == max_new - 1:
                        break
                    lg = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True,
                               cache_position=torch.tensor([p + qn + i])).logits[0, -1]
                _rewind(cache, p)
            text = tokenizer.decode(toks)
            if dense_tokens is None:
                dense_tokens = toks
            agree = sum(a == b for a, b in zip(toks, dense_tokens)) / max(len(dense_tokens), 1)
            rows.append({"task": case.task, "length": case.length, "tokens": p + qa.shape[1], "depth": case.depth,
                         "seed": case.seed, "policy": pol.name, "label": pol.label(), "budget": pol.budget,
                         "answer": case.answer.strip(), "output": text,
                         "correct": first_number(text) == case.answer.strip(), "logprob": lp, "agree": agree})
    return rows


def generate_rows(model, tokenizer, cases: list[Case], policy, max_new: int = 8, progress: bool = True) -> list[dict]:
    """Each case answered by ``model.generate`` on the plain model and on ``torch.compile(model.forward,
    backend="dsparse")`` with ``policy``'s knobs (a dsparse Policy): correctness of both, and token agreement."""
    import torch
    from tqdm import tqdm

    opts = policy.backend_options(inner="eager")
    rows = []
    kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    for case in tqdm(cases, desc="generate", unit="case", disable=not progress):
        ids = tokenizer(case.context + case.question, return_tensors="pt").input_ids
        with torch.no_grad():
            dense = model.generate(ids, **kw)[0, ids.shape[1]:].tolist()
            model.forward = torch.compile(model.forward, backend="dsparse", options=opts)
            try:
                sparse = model.generate(ids, **kw)[0, ids.shape[1]:].tolist()
            finally:
                del model.forward
        text, dense_text = tokenizer.decode(sparse), tokenizer.decode(dense)
        rows.append({"task": case.task, "length": case.length, "tokens": ids.shape[1], "depth": case.depth,
                     "seed": case.seed, "label": policy.label() + " (compiled generate)", "answer": case.answer.strip(),
                     "output": text, "dense_output": dense_text,
                     "correct": first_number(text) == case.answer.strip(),
                     "dense_correct": first_number(dense_text) == case.answer.strip(),
                     "agree": sum(a == b for a, b in zip(sparse, dense)) / max(len(dense), 1)})
    return rows


def _rewind(cache, length: int) -> None:
    """Drop every cached position from ``length`` on (the next policy starts from the prefilled context)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def summarize(rows: list[dict], by=("task", "label", "length")) -> list[dict]:
    """Mean accuracy, answer log-probability (and its relative gap to dense), agreement per group."""
    dense_lp = {(r["task"], r["length"], r["depth"], r["seed"]): r["logprob"] for r in rows if r["policy"] == "dense"}
    dense_ok = {(r["task"], r["length"], r["depth"], r["seed"]): r["correct"] for r in rows if r["policy"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        ids = [(r["task"], r["length"], r["depth"], r["seed"]) for r in rs]
        dlp = [dense_lp[i] for i in ids]
        ok_dense = [r for r, i in zip(rs, ids) if dense_ok[i]]
        out.append({**dict(zip(by, key)), "cases": len(rs),
                    "accuracy": sum(r["correct"] for r in rs) / len(rs),
                    "kept": (sum(r["correct"] for r in ok_dense) / len(ok_dense)) if ok_dense else None,
                    "logprob": sum(r["logprob"] for r in rs) / len(rs),
                    "dense_logprob": sum(dlp) / len(dlp),
                    "logprob_gap": sum(abs(r["logprob"] - d) for r, d in zip(rs, dlp)) / max(1e-9, sum(map(abs, dlp))),
                    "agree": sum(r["agree"] for r in rs) / len(rs)})
    return out


def add_arguments(p):
    from dsc.evaluation.ppl import add_policy_arguments

    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--task", default="passkey,lines", help="comma-separated tasks: passkey, lines")
    p.add_argument("--lengths", default="512,1024", help="comma-separated context lengths in tokens (2K ok)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=2, help="cases per (task, length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new", type=int, default=8, help="greedy tokens generated per answer")
    p.add_argument("--generate", action="store_true",
                   help="also answer through model.generate on torch.compile(model, backend='dsparse') (dsparse "
                        "policies), next to model.generate on the plain model")
    add_policy_arguments(p)
    p.add_argument("--json", default=None, metavar="PATH", help="write every case and the summary as JSON")


def evaluate(model, tok, policies, tasks, lengths, depths, samples, seed, max_new=8, chunk=256, progress=True):
    """Every case under every policy; returns (rows, summary)."""
    from tqdm import tqdm

    cases = make_cases(tok, tasks, lengths, depths, samples, seed)
    rows = []
    for case in tqdm(cases, desc="retrieval", unit="case", disable=not progress):
        rows += run_case(model, tok, case, policies, max_new=max_new, chunk=chunk)
    return rows, summarize(rows)


def run(args) -> int:
    from dsc.assets import check_context, load_model
    from dsc.bench.common import parse_list, write_json
    from dsc.evaluation.ppl import policies_from_args

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if not tasks or any(t not in ("passkey", "lines") for t in tasks):
        raise ValueError(f"--task must list passkey and/or lines, got {args.task!r}")
    lengths = parse_list(args.lengths, int, "--lengths")
    depths = parse_list(args.depths, float, "--depths")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths must lie in [0, 1], got {args.depths!r}")
    if args.samples <= 0 or args.max_new <= 0:
        raise ValueError("--samples and --max-new must be positive")
    model, tok = load_model(args.model, dtype=args.dtype)
    for n in lengths:
        check_context(model, n + 64, "--lengths")
    pols = policies_from_args(args, model, tok)
    rows, summary = evaluate(model, tok, pols, tasks, lengths, depths, args.samples, args.seed, args.max_new,
                             args.chunk)
    print(f"{'task':<8} {'policy':<58} {'len':>5} {'acc':>5} {'kept':>5} {'logprob':>8} {'dense':>8} "
          f"{'gap':>6} {'agree':>6}")
    for s in summary:
        kept = "-" if s["kept"] is None else f"{s['kept']:.2f}"
        print(f"{s['task']:<8} {s['label']:<58} {s['length']:>5} {s['accuracy']:5.2f} {kept:>5} "
              f"{s['logprob']:8.3f} {s['dense_logprob']:8.3f} {100 * s['logprob_gap']:5.1f}% {s['agree']:6.2f}")
    generated = []
    if args.generate:
        import torch

        cases = make_cases(tok, tasks, lengths, depths, args.samples, args.seed)
        for pol in [p for p in pols if p.name == "dsparse"]:
            torch._dynamo.reset()
            generated += generate_rows(model, tok, cases, pol, args.max_new)
        print(f"\n{'task':<8} {'policy':<58} {'len':>5} {'acc':>5} {'dense':>5} {'agree':>6}")
        for key in sorted({(g["task"], g["label"], g["length"]) for g in generated}):
            rs = [g for g in generated if (g["task"], g["label"], g["length"]) == key]
            print(f"{key[0]:<8} {key[1]:<58} {key[2]:>5} {sum(g['correct'] for g in rs) / len(rs):5.2f} "
                  f"{sum(g['dense_correct'] for g in rs) / len(rs):5.2f} {sum(g['agree'] for g in rs) / len(rs):6.2f}")
    write_json(args.json, {"summary": summary, "cases": rows, "generate": generated})
    return 0
