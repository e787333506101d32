"""Quality of phase-wise quantization and quantized KV, measured on the disaggregated data path.

For every (prefill_dtype, kv_dtype): a context is prefilled through the prefill-precision weights,
its KV is written in the KV format, and the continuation is scored teacher-forced by the decode
path (the model's own dtype) over that stored KV; the first continuation token is scored from
the prefill's last logits, as a decode host receives it. Reports perplexity on WikiText-2,
multiple-choice accuracy, and greedy agreement with the reference (bf16 prefill, bf16 KV).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hma.batch import Batch, SeqChunk
from hma.bench import write_json
from hma.config import EngineConfig
from hma.engine import LLMEngine, run_to_completion
from hma.loading import (apply_chat_template, load_model, resolve_device, resolve_dtype, resolve_kv_format,
                         set_prefill_precision)
from hma.kv_cache import KVCache, blocks_for
from hma.qwen3 import Qwen3ForCausalLM
from hma.sampling import SamplingParams

log = logging.getLogger(__name__)

EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "eval"  # ../shared/eval from the repo
MC_SETS = ("arc_easy_test", "arc_challenge_test", "hellaswag_val", "piqa_val")
MC_LABELS = ("ARC-e", "ARC-c", "HellaSwag", "PIQA")
BLOCK_SIZE = 16
TOKENS_PER_BATCH = 4096
GROUPS_PER_BATCH = 256
MAX_GROUP_LEN = 2048


Group = tuple[list[int], list[list[int]]]  # a context and the continuations scored after it


class Scorer:
    """Log-probabilities of continuations given a context, through one model and one KV format.

    A context is prefilled once; its continuations are then scored one round each over the same
    stored context KV, each round overwriting the slots after the context (the choices of a
    multiple-choice item share their question this way)."""

    def __init__(self, model: Qwen3ForCausalLM, kv_dtype: str) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        fmt = resolve_kv_format(kv_dtype, next(model.parameters()).dtype)
        # Each group rounds up to whole blocks: at most one block more than its tokens need.
        self.max_blocks = blocks_for(TOKENS_PER_BATCH + MAX_GROUP_LEN, BLOCK_SIZE) + GROUPS_PER_BATCH
        self.cache = KVCache(model.config, self.max_blocks, BLOCK_SIZE, fmt, self.device)

    def score(self, groups: list[Group]) -> list[list[torch.Tensor]]:
        """For each group, for each continuation: the log-prob of every continuation token."""
        if any(len(ctx) + max(map(len, conts)) > MAX_GROUP_LEN for ctx, conts in groups):
            raise ValueError(f"a context + continuation is longer than {MAX_GROUP_LEN} tokens")
        out: list[list[torch.Tensor]] = []
        start = 0
        while start < len(groups):
            end, tokens = start, 0
            while end < len(groups) and end - start < GROUPS_PER_BATCH and (
                    end == start or tokens + _group_len(groups[end]) <= TOKENS_PER_BATCH):
                tokens += _group_len(groups[end])
                end += 1
            out += self._score_batch(groups[start:end])
            start = end
        return out

    def _score_batch(self, groups: list[Group]) -> list[list[torch.Tensor]]:
        tables, next_block = [], 0
        for ctx, conts in groups:
            n = blocks_for(len(ctx) + max(map(len, conts)), BLOCK_SIZE)
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        assert next_block <= self.max_blocks
        # Prefill phase: contexts in prefill precision; the last logits score each cont[0].
        prefill = [SeqChunk(ctx, 0, t) for (ctx, _), t in zip(groups, tables)]
        first = self.model(Batch.build(prefill, [], BLOCK_SIZE, self.device), self.cache).log_softmax(-1)
        scores = [[first[g, cont[0]].reshape(1) for cont in conts] for g, (_, conts) in enumerate(groups)]
        # Decode phase: the rest of each continuation, teacher-forced over the stored KV.
        for j in range(max(len(conts) for _, conts in groups)):
            rest = [g for g, (_, conts) in enumerate(groups) if j < len(conts) and len(conts[j]) > 1]
            if rest:
                self._score_round(groups, tables, rest, j, scores)
        return [[s.float().cpu() for s in group] for group in scores]

    def _score_round(self, groups: list[Group], tables: list[list[int]], rest: list[int], j: int,
                     scores: list[list[torch.Tensor]]) -> None:
        chunks = [SeqChunk(groups[g][1][j][:-1], len(groups[g][0]), tables[g], all_logits=True,
                           prefill_precision=False) for g in rest]
        logprobs = self.model(Batch.build(chunks, [], BLOCK_SIZE, self.device), self.cache).log_softmax(-1)
        offset = 0
        for g in rest:
            cont = groups[g][1][j]
            rows = logprobs[offset:offset + len(cont) - 1]
            targets = torch.tensor(cont[1:], device=rows.device)
            scores[g][j] = torch.cat([scores[g][j], rows.gather(1, targets[:, None])[:, 0]])
            offset += len(cont) - 1


def _group_len(group: Group) -> int:
    return len(group[0]) + sum(map(len, group[1]))


@dataclass(frozen=True, slots=True)
class EvalData:
    """Token-level inputs shared by every combination, prepared once."""

    ppl_groups: list[Group]
    mc_items: dict[str, list[dict]]  # set -> [{"group": Group, "label": int, "choice_chars": [...]}]
    chat_prompts: list[list[int]]


def load_data(tokenizer, data_dir: Path, ppl_windows: int, ppl_context: int, ppl_continuation: int,
              mc_items: int, chat_prompts: int) -> EvalData:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"evaluation data not found at {data_dir}; pass --data-dir")
    text = (data_dir / "wikitext2_raw_test.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    window = ppl_context + ppl_continuation
    starts = torch.linspace(0, len(ids) - window, ppl_windows).long().tolist()
    ppl_groups = [(ids[s:s + ppl_context], [ids[s + ppl_context:s + window]]) for s in starts]
    mc = {name: _mc_items(tokenizer, data_dir / f"{name}.jsonl", mc_items) for name in MC_SETS}
    chats = [json.loads(line) for line in (data_dir / "chat_prompts.jsonl").read_text().splitlines()]
    step = max(1, len(chats) // chat_prompts)
    prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": c["turns"][0]}])
               for c in chats[::step][:chat_prompts]]
    return EvalData(ppl_groups, mc, prompts)


def _mc_items(tokenizer, path: Path, limit: int) -> list[dict]:
    """Each choice's tokens are what context + choice adds to the context's tokens (the
    lm-evaluation-harness split), so a token merging across the boundary is scored with the choice."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    step = max(1, len(records) // limit)
    items = []
    for rec in records[::step][:limit]:
        ctx = tokenizer(rec["context"], add_special_tokens=False).input_ids
        conts = []
        for choice in rec["choices"]:
            whole = tokenizer(rec["context"] + choice, add_special_tokens=False).input_ids
            conts.append(whole[len(ctx):] or whole[-1:])
        items.append({"group": (ctx, conts), "label": rec["label"],
                      "choice_chars": [len(c) for c in rec["choices"]]})
    return items


def evaluate(model: Qwen3ForCausalLM, tokenizer, eos_ids: list[int], data: EvalData,
             prefill_dtype: str, kv_dtype: str, chat_tokens: int, smoothquant_alpha: float = 0.0) -> dict:
    """Every metric for one (prefill_dtype, kv_dtype), with the raw scores the deltas need."""
    set_prefill_precision(model, tokenizer, prefill_dtype, smoothquant_alpha)
    scorer = Scorer(model, kv_dtype)
    t0 = time.perf_counter()
    ppl_scores = torch.cat([conts[0] for conts in scorer.score(data.ppl_groups)])
    result = {"prefill_dtype": prefill_dtype, "kv_dtype": kv_dtype, "smoothquant_alpha": smoothquant_alpha,
              "ppl": math.exp(-ppl_scores.mean().item()), "ppl_tokens": ppl_scores.numel(), "mc": {}}
    for name, items in data.mc_items.items():
        scores = scorer.score([item["group"] for item in items])
        loglik = [[s.sum().item() for s in choices] for choices in scores]
        result["mc"][name] = _mc_metrics(items, loglik)
    result["chat_outputs"] = _greedy(model, tokenizer, eos_ids, kv_dtype, data.chat_prompts, chat_tokens)
    result["seconds"] = time.perf_counter() - t0
    return result


def _mc_metrics(items: list[dict], loglik: list[list[float]]) -> dict:
    picks = [max(range(len(ll)), key=ll.__getitem__) for ll in loglik]
    norm = [max(range(len(ll)), key=lambda j: ll[j] / it["choice_chars"][j]) for ll, it in zip(loglik, items)]
    return {"acc": sum(p == it["label"] for p, it in zip(picks, items)) / len(items),
            "acc_norm": sum(p == it["label"] for p, it in zip(norm, items)) / len(items),
            "picks": picks, "loglik": loglik, "items": len(items)}


def _greedy(model: Qwen3ForCausalLM, tokenizer, eos_ids: list[int], kv_dtype: str,
            prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy generations through the engine (prefill precision for the prompt, then decode)."""
    config = EngineConfig(block_size=BLOCK_SIZE, kv_dtype=kv_dtype)
    fmt = resolve_kv_format(kv_dtype, next(model.parameters()).dtype)
    # one block more: on CUDA the decode graphs keep one for their padding rows
    need = sum(blocks_for(len(p) + max_tokens, BLOCK_SIZE) for p in prompts) + 1
    cache = KVCache(model.config, need, BLOCK_SIZE, fmt, next(model.parameters()).device)
    engine = LLMEngine(model, cache, config, tokenizer, eos_ids)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [o.token_ids for o in run_to_completion(engine, [{"prompt_token_ids": p} for p in prompts], params)]


def compare(result: dict, reference: dict) -> dict:
    """Deltas of one combination against the reference run."""
    out = {"ppl_delta_pct": 100 * (result["ppl"] / reference["ppl"] - 1), "mc": {}}
    for name, mc in result["mc"].items():
        ref = reference["mc"][name]
        diffs = [abs(a - b) for la, lb in zip(mc["loglik"], ref["loglik"]) for a, b in zip(la, lb)]
        out["mc"][name] = {"acc_delta_pts": 100 * (mc["acc"] - ref["acc"]),
                           "changed": sum(a != b for a, b in zip(mc["picks"], ref["picks"])),
                           "mean_abs_loglik_delta": sum(diffs) / len(diffs)}
    pairs = list(zip(result["chat_outputs"], reference["chat_outputs"]))
    out["greedy_identical"] = sum(a == b for a, b in pairs) / len(pairs)
    out["greedy_match_prefix"] = sum(_common_prefix(a, b) for a, b in pairs) / len(pairs)
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> list[dict]:
    """`python -m hma eval`: every combination of the given precisions, a table, and JSON."""
    args = _parser().parse_args(argv)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    device = resolve_device(config.device)
    model, tokenizer, eos_ids = load_model(config, device, resolve_dtype(config.dtype, device))
    data = load_data(tokenizer, args.data_dir, args.ppl_windows, args.ppl_context, args.ppl_continuation,
                     args.mc_items, args.chat_prompts)
    combos = [(p, k) for p in args.prefill_dtype.split(",") for k in args.kv_dtype.split(",")]
    reference = None
    rows = []
    print(TABLE_HEADER)
    for prefill_dtype, kv_dtype in [REFERENCE] + [c for c in combos if c != REFERENCE]:
        alpha = 0.0 if prefill_dtype == "bf16" else args.smoothquant_alpha
        result = evaluate(model, tokenizer, eos_ids, data, prefill_dtype, kv_dtype, args.chat_tokens, alpha)
        reference = reference or result
        result["vs_reference"] = compare(result, reference)
        rows.append(result)
        print(_table_row(result))
    summary = {"model": args.model, "device": str(device), "date": time.strftime("%Y-%m-%d"),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "data_dir")},
               "reference": {"prefill_dtype": REFERENCE[0], "kv_dtype": REFERENCE[1]}, "rows": rows}
    write_json(args.json, summary, indent=None)
    print(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The README's table: deltas against the reference row, accuracy per set in points."""
    lines = ["| prefill | KV | SmoothQuant | ppl | Δ ppl | " + " | ".join(MC_LABELS) +
             " | mean Δ acc | answers changed | greedy identical | matching prefix |",
             "|---|---|---|---:|---:|" + "---:|" * len(MC_SETS) + "---:|---:|---:|---:|"]
    for r in rows:
        vs = r["vs_reference"]
        accs = " | ".join(f"{100 * r['mc'][s]['acc']:.1f}" for s in MC_SETS)
        delta = sum(vs["mc"][s]["acc_delta_pts"] for s in MC_SETS) / len(MC_SETS)
        changed = sum(vs["mc"][s]["changed"] for s in MC_SETS)
        items = sum(r["mc"][s]["items"] for s in MC_SETS)
        alpha = r.get("smoothquant_alpha") or "-"
        lines.append(f"| {r['prefill_dtype']} | {r['kv_dtype']} | {alpha} | {r['ppl']:.3f} | "
                     f"{vs['ppl_delta_pct']:+.2f}% | {accs} | {delta:+.2f} | {changed}/{items} | "
                     f"{100 * vs['greedy_identical']:.0f}% | {vs['greedy_match_prefix']:.1f} |")
    return "\n".join(lines)


REFERENCE = ("bf16", "bf16")
TABLE_HEADER = (f"{'prefill':>7} {'kv':>5} {'ppl':>8} {'d ppl %':>8} " +
                " ".join(f"{s.split('_')[0][:9]:>9}" for s in MC_SETS) +
                f" {'d acc':>6} {'changed':>7} {'greedy=':>7} {'prefix':>6}")


def _table_row(r: dict) -> str:
    vs = r["vs_reference"]
    accs = " ".join(f"{100 * r['mc'][s]['acc']:>9.1f}" for s in MC_SETS)
    mean_delta = sum(vs["mc"][s]["acc_delta_pts"] for s in MC_SETS) / len(MC_SETS)
    changed = sum(vs["mc"][s]["changed"] for s in MC_SETS)
    return (f"{r['prefill_dtype']:>7} {r['kv_dtype']:>5} {r['ppl']:>8.3f} {vs['ppl_delta_pct']:>+8.2f} "
            f"{accs} {mean_delta:>+6.2f} {changed:>7} {100 * vs['greedy_identical']:>6.0f}% "
            f"{vs['greedy_match_prefix']:>6.1f}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hma eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prefill-dtype", default="bf16,fp8,int8,bfp8", help="comma-separated")
    parser.add_argument("--kv-dtype", default="bf16,fp8,int8,int4,bfp8", help="comma-separated")
    parser.add_argument("--smoothquant-alpha", type=float, default=0.0,
                        help="SmoothQuant strength for the 8-bit prefill rows (0: off)")
    parser.add_argument("--data-dir", type=Path, default=EVAL_DIR)
    parser.add_argument("--ppl-windows", type=int, default=64, help="WikiText-2 windows scored")
    parser.add_argument("--ppl-context", type=int, default=256, help="context tokens per window (prefill)")
    parser.add_argument("--ppl-continuation", type=int, default=256, help="scored tokens per window (decode)")
    parser.add_argument("--mc-items", type=int, default=250, help="items per multiple-choice set")
    parser.add_argument("--chat-prompts", type=int, default=24)
    parser.add_argument("--chat-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    return parser
