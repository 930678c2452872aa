"""Continuous batching on the rollout engine's pieces: rows join a running decode batch at the next step and leave
it at the step they finish, whatever their prefix.

`RunningBatch.iterate(joining)` is one turn of the server's decode loop:
1. rows whose client left (or whose stop string appeared: `Row.cancelled`) leave;
2. one decode step for the running rows: `static_cache.model_step` over the `SlotCache`, each row at its own position;
3. the joining rows are started with `static_cache.open_rows` (their prefix K/V and prompt, any mix of prefixes in one
   prefill) and moved into free slots, aligned so that their next token is written where the running rows write;
4. every row picks its next token with its own sampling parameters (greedy rows together, sampled rows grouped by
   temperature and top_p for `models.sampling.choose`) from the engine's counter-based uniform for (row seed, the row's
   token index). So a row's tokens depend neither on which rows share its steps nor on the step it joined at: they
   equal `engine.sample` for that prompt alone with the same seed (up to the float rounding of another batch shape,
   as in any batch). A row that asked for log-probs gets its token's log-prob under the policy it was sampled
   from, log softmax(logits / T) before top-p (T = 1 for greedy rows), as the engine records it, and the best
   alternatives under the same policy;
5. rows that sampled EOS or reached their `max_tokens` leave, and their slots are free for the next joiners.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

from rlprefix.serve.batcher import Row, RowResult
from rlprefix.decoding.bank import PrefixBank
from rlprefix.decoding.static_cache import model_step, open_rows
from rlprefix.models.sampling import choose, policy_logprobs, seed_halves, uniforms
from rlprefix.models.sampling import eos_ids
from rlprefix.serve.metrics import Metrics
from rlprefix.serve.slots import SlotCache
from rlprefix.models.sampling import pad_token_id


class BankCache:
    """`PrefixBank`s for prefills, one per set of prefixes, kept least-recently-used.

    A bank holds only the prefixes its rows use (so its padded length is theirs, not the longest loaded prefix),
    and the same set of prefixes is not stacked again for the next prefill. A prefix is identified by name and by
    its K/V tensor (rows capture it at submit time, so a reload mid-flight gives a new key); each entry keeps those
    tensors alive, so their ids cannot be reused while the entry exists.
    """

    def __init__(self, model, size: int = 16, metrics: Metrics | None = None):
        self.model, self.size, self.metrics = model, size, metrics
        self._banks: OrderedDict[tuple, tuple[PrefixBank, list[torch.Tensor]]] = OrderedDict()

    def lookup(self, rows: list[Row]) -> tuple[PrefixBank | None, torch.Tensor]:
        """(bank or None when every row is `base`, prefix_index LongTensor [rows] with -1 for `base`)."""
        unique = {(r.prefix, id(r.kv)): r.kv for r in rows if r.kv is not None}
        if not unique:
            return None, torch.full((len(rows),), -1, dtype=torch.long)
        key = tuple(sorted(unique))
        if key in self._banks:
            self._banks.move_to_end(key)
        else:
            self._banks[key] = (self._build(key, unique), list(unique.values()))
            if len(self._banks) > self.size:
                self._banks.popitem(last=False)
        slot = {k: i for i, k in enumerate(key)}
        index = [slot[(r.prefix, id(r.kv))] if r.kv is not None else -1 for r in rows]
        return self._banks[key][0], torch.tensor(index, dtype=torch.long)

    def _build(self, key: tuple, unique: dict) -> PrefixBank:
        if self.metrics is not None:
            self.metrics.inc("rlprefix_prefix_banks_built_total")
        return PrefixBank(self.model, [unique[k] for k in key])


def pad_left(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def sampling_key(r: Row) -> tuple:
    """Rows that pick their tokens in one `models.sampling.choose` call: greedy rows, sampled rows by (temperature, top_p)."""
    return ("greedy",) if r.temperature == 0 else ("sample", r.temperature, r.top_p)


@dataclass
class _Running:
    row: Row
    start: int                    # position of its first completion token (its prefix length + prompt length)
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per token, when the row asked: (log-prob, best alternatives)


@dataclass
class Turn:
    """What one `iterate` produced: each running row's new token (and its log-prob record, None unless the row
    asked), and the rows that left with their results."""
    tokens: list[tuple[Row, int, tuple | None]] = field(default_factory=list)
    finished: list[tuple[Row, RowResult]] = field(default_factory=list)
    failed: list[tuple[Row, Exception]] = field(default_factory=list)


class RunningBatch:
    """The rows being decoded (at most `max_rows`; a row may use up to `limit` positions: prefix + prompt +
    max_tokens). Owned by one thread; see the module docstring."""

    def __init__(self, model, tok, banks: BankCache, max_rows: int, limit: int, metrics: Metrics | None = None):
        self.model, self.tok, self.banks, self.max_rows, self.limit = model, tok, banks, max_rows, limit
        self.metrics = metrics if metrics is not None else Metrics()
        self.eos = set(eos_ids(model, tok))
        self.pad = pad_token_id(tok, model)
        self.slots = SlotCache(model, max_rows, limit)
        self.running: list[_Running] = []  # in slot order

    def free(self) -> int:
        return self.max_rows - len(self.running)

    @torch.no_grad()
    def iterate(self, joining: list[Row]) -> Turn:
        """One turn (the module docstring's steps 1-5); `joining` (at most `free()` rows) get their first token."""
        turn = Turn()
        self._leave([i for i, r in enumerate(self.running) if r.row.cancelled.is_set()], turn)
        if len(joining) > self.free():
            raise ValueError(f"{len(joining)} rows cannot join: {self.free()} of {self.max_rows} slots are free")
        joining = self._admissible(joining, turn)
        logits = [self._decode()] if self.running else []
        if joining:
            self.metrics.inc("rlprefix_rows_admitted_total", len(joining))
            if self.running:
                self.metrics.inc("rlprefix_rows_joined_running_total", len(joining))
            logits.append(self._join(joining))
        if self.running:
            self.metrics.observe("rlprefix_batch_rows", len(self.running))
            self.metrics.observe("rlprefix_batch_prefixes", len({r.row.prefix for r in self.running}))
            self.metrics.inc("rlprefix_decoded_tokens_total", len(self.running))
            ended = []
            for i, (r, t, lp) in enumerate(zip(self.running, *self._choose(torch.cat(logits)))):
                r.tokens.append(t)
                if lp is not None:
                    r.logprobs.append(lp)
                turn.tokens.append((r.row, t, lp))
                if self._ends(r.row, t) or len(r.tokens) >= r.row.max_tokens:
                    ended.append(i)
            self._leave(ended, turn)
        self.metrics.set("rlprefix_decode_rows", len(self.running))
        return turn

    def _ends(self, row: Row, token: int) -> bool:
        """Whether `token` ends `row` as an EOS (never for an ignore_eos row)."""
        return token in self.eos and not row.ignore_eos

    def abort(self) -> list[Row]:
        """Drop every running row (after a failed step); returns them."""
        rows = [r.row for r in self.running]
        self.slots.remove(list(range(len(self.running))))
        self.running = []
        self.metrics.set("rlprefix_decode_rows", 0)
        return rows

    def _admissible(self, rows: list[Row], turn: Turn) -> list[Row]:
        """Rows to start: a row cancelled meanwhile ends empty, one too long for `limit` fails."""
        keep = []
        for r in rows:
            need = (r.kv.shape[2] if r.kv is not None else 0) + len(r.prompt_ids) + r.max_tokens
            if r.cancelled.is_set():
                turn.finished.append((r, RowResult([], "", False)))
            elif need > self.limit:
                turn.failed.append((r, ValueError(f"prefix + prompt + max_tokens is {need} positions; the limit is "
                                                  f"{self.limit}")))
            else:
                keep.append(r)
        return keep

    def _decode(self) -> torch.Tensor:
        """One step of the running rows: each feeds its last token at its own next position."""
        device = self.model.device
        cache, mask = self.slots.step()
        ids = torch.tensor([[r.tokens[-1]] for r in self.running], device=device)
        pos = torch.tensor([[r.start + len(r.tokens) - 1] for r in self.running], device=device)
        return model_step(self.model, ids, pos, mask, cache, False)[0]

    def _join(self, rows: list[Row]) -> torch.Tensor:
        """Prefill the joining rows together and move them into slots; returns their next-token logits."""
        device = self.model.device
        bank, index = self.banks.lookup(rows)
        ids, mask = pad_left([r.prompt_ids for r in rows], self.pad)
        total = (bank.max_length if bank is not None else 0) + ids.shape[1]
        cache = StaticCache(config=self.model.config, max_cache_len=total)
        valid, last, logits, _ = open_rows(self.model, ids.to(device), mask.to(device), bank, index.to(device),
                                           cache, total)
        self.slots.add(cache, valid)
        self.running += [_Running(r, p + 1) for r, p in zip(rows, last[:, 0].tolist())]
        return logits

    def _choose(self, logits: torch.Tensor) -> tuple[list[int], list[tuple | None]]:
        """Each row's next token, as `engine.sample` picks it for that row alone, and its log-prob record (None for
        rows that did not ask)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.running):
            groups.setdefault(sampling_key(r.row), []).append(i)
        nxt = torch.empty(len(self.running), dtype=torch.long, device=logits.device)
        records: list[tuple | None] = [None] * len(self.running)
        for key, members in groups.items():
            at = torch.tensor(members, device=logits.device)
            if key[0] == "greedy":
                logp = policy_logprobs(logits[at], 1.0, 1)
                picked = choose(logp, None, 0, 1.0)
            else:
                temperature, top_p = key[1:]
                seeds = seed_halves([self.running[i].row.seed for i in members], logits.device)
                counters = torch.tensor([len(self.running[i].tokens) for i in members], device=logits.device)
                logp = policy_logprobs(logits[at], temperature, 1)
                picked = choose(logp, uniforms(seeds, counters), 0, top_p)
            nxt[at] = picked
            self._record(members, logp, picked, records)
        return nxt.tolist(), records

    def _record(self, members: list[int], logp: torch.Tensor, picked: torch.Tensor, records: list) -> None:
        """records[i] = (log-prob of row i's token, [(id, log-prob)] of its best `row.logprobs` alternatives) for
        the rows of this sampling group that asked; `logp` is the group's policy, rows in `members` order."""
        want = [j for j, i in enumerate(members) if self.running[i].row.logprobs is not None]
        if not want:
            return
        sel = torch.tensor(want, device=logp.device)
        lp = logp[sel]
        chosen = lp.gather(1, picked[sel][:, None])[:, 0].tolist()
        k = max(self.running[members[j]].row.logprobs for j in want)
        values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        values, ids = values.tolist(), ids.tolist()
        for n, j in enumerate(want):
            kj = self.running[members[j]].row.logprobs
            records[members[j]] = (chosen[n], list(zip(ids[n][:kj], values[n][:kj])))

    def _leave(self, slots: list[int], turn: Turn) -> None:
        if not slots:
            return
        for i in slots:
            r = self.running[i]
            toks = r.tokens
            text = self.tok.decode(toks, skip_special_tokens=True)
            lps = list(r.logprobs) if r.row.logprobs is not None else None
            turn.finished.append((r.row, RowResult(toks, text, bool(toks) and self._ends(r.row, toks[-1]), lps)))
        order = self.slots.remove(slots)
        self.running = [self.running[i] for i in order]
