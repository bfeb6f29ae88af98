"""Training batches, candidate scores, batched evaluation and the SQuAD answer metrics.

LM loss (the ``lm`` objective): the mean token negative log-likelihood of the gold
continuation given the prompt. :func:`loss_batch` builds right-padded ``input_ids``,
``attention_mask`` and ``labels`` in the Hugging Face convention (``labels`` aligned with
``input_ids``, the model shifts them; -100 everywhere except the gold continuation tokens), so
``model(**batch).loss`` is that mean over all gold tokens of the batch. Generation targets are
followed by :data:`ANSWER_END` so that the model learns where an answer stops.

Candidate scores: the mean log-probability of a candidate's tokens given the prompt.
:func:`encode_candidates` tokenizes a batch of examples into a :class:`ScoreBatch` and
:func:`mean_logprobs` computes every candidate's score in one forward pass (differentiable, so
the ``classification`` objective of :mod:`llm.tasks.objective` trains on the very scores that
evaluation argmaxes); only the logits of the continuation positions are projected onto the
vocabulary when the model supports ``logits_to_keep``.

Evaluation: classification predicts the highest-scoring candidate (right when it is one of
the example's ``correct`` candidates). Generation decodes greedily (left
padded) until a newline or ``max_new_tokens`` and reports SQuAD token F1 and exact match
against the best-matching reference.
"""

from __future__ import annotations

import inspect
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from llm.tasks.base import ANSWER_END, Example, TaskError

IGNORE_INDEX = -100
_PUNCTUATION = frozenset(string.punctuation)


# --------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 between two answers (1.0 when both normalise to empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# --------------------------------------------------------------------------- encoding


def _cut_prompt(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """Drop tokens on the left so that ``keep`` remain, keeping a leading BOS token."""
    if len(ids) <= keep:
        return ids
    bos = ids[:1] if ids[0] == bos_id else []
    return bos + ids[len(ids) - keep + len(bos) :]


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    continuations: list[str],
    max_length: int,
) -> list[tuple[list[int], int]]:
    """``(prompt ids + continuation ids, prompt length)`` per pair, cut to ``max_length``.

    Over-long prompts lose tokens on the left (a leading BOS token is kept).
    """
    prompt_ids = tokenizer(prompts)["input_ids"]
    cont_ids = tokenizer(continuations, add_special_tokens=False)["input_ids"]
    out = []
    for p, c, text in zip(prompt_ids, cont_ids, continuations, strict=True):
        if not c or not p:
            what = f"continuation {text!r}" if not c else "prompt before " + repr(text)
            raise TaskError(f"the {what} encodes to no tokens; scoring needs at least one each")
        c = c[: max_length - 1]
        p = _cut_prompt(p, max_length - len(c), tokenizer.bos_token_id)
        out.append((p + c, len(p)))
    return out


def _pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def loss_batch(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int = 1024
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, T) for the loss.

    ``labels`` is -100 everywhere except on the gold continuation's tokens.
    """
    if not examples:
        raise TaskError("loss_batch needs at least one example")
    targets = [e.target + (ANSWER_END if e.candidates is None else "") for e in examples]
    encoded = _encode(tokenizer, [e.prompt for e in examples], targets, max_length)
    input_ids, attention_mask = _pad_right([ids for ids, _ in encoded], tokenizer.pad_token_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (ids, start) in enumerate(encoded):
        labels[i, start : len(ids)] = input_ids[i, start : len(ids)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- candidate scores


@dataclass
class ScoreBatch:
    """Token rows and the picks whose log-probabilities make up each candidate's score.

    Pick ``j`` reads ``log p(tokens[j] | input_ids[rows[j], : cols[j] + 1])`` and belongs to
    candidate ``owner[j]``; a candidate's score is the mean over its picks. ``first`` is the
    smallest column picked: logits left of it are never projected onto the vocabulary.
    """

    input_ids: torch.Tensor  # (R, T), right padded
    attention_mask: torch.Tensor  # (R, T)
    rows: torch.Tensor  # (P,)
    cols: torch.Tensor  # (P,)
    tokens: torch.Tensor  # (P,)
    owner: torch.Tensor  # (P,)
    counts: torch.Tensor  # (N,) picks per candidate
    first: int

    def to(self, device: torch.device | str, **kwargs) -> ScoreBatch:
        moved = {k: v.to(device, **kwargs) for k, v in vars(self).items() if torch.is_tensor(v)}
        return replace(self, **moved)


def _score_batch(
    seqs: list[list[int]], picks: list[tuple[int, int, int]], owner: list[int], pad_id: int
) -> ScoreBatch:
    input_ids, attention_mask = _pad_right(seqs, pad_id)
    rows, cols, tokens = (torch.tensor(c) for c in zip(*picks, strict=True))
    owners = torch.tensor(owner)
    counts = torch.bincount(owners, minlength=max(owner) + 1)
    first = min(col for _, col, _ in picks)
    return ScoreBatch(input_ids, attention_mask, rows, cols, tokens, owners, counts, first)


def encode_continuations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    continuations: list[str],
    max_length: int = 1024,
) -> ScoreBatch:
    """One row per ``(prompt, continuation)`` pair, picking every continuation token."""
    encoded = _encode(tokenizer, prompts, continuations, max_length)
    picks, owner = [], []
    for i, (ids, start) in enumerate(encoded):
        picks += [(i, t - 1, ids[t]) for t in range(start, len(ids))]
        owner += [i] * (len(ids) - start)
    return _score_batch([ids for ids, _ in encoded], picks, owner, tokenizer.pad_token_id)


def encode_candidates(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int = 1024
) -> ScoreBatch:
    """The scores of every candidate of every example, in order (example by example).

    When every candidate is a single token (SST-2 words, Yes/No/Maybe in most tokenizers)
    each prompt is one row and all its candidates are read from the same next-token
    distribution: the same scores as one row per candidate, with K times fewer rows.
    """
    if not examples or any(e.candidates is None for e in examples):
        raise TaskError("candidate scores need one or more classification examples")
    conts = [c for e in examples for c in e.candidates]
    cont_ids = tokenizer(conts, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer([e.prompt for e in examples])["input_ids"]
    if not (all(len(c) == 1 for c in cont_ids) and all(prompt_ids)):
        prompts = [e.prompt for e in examples for _ in e.candidates]
        return encode_continuations(tokenizer, prompts, conts, max_length)
    seqs = [_cut_prompt(p, max_length - 1, tokenizer.bos_token_id) for p in prompt_ids]
    rows = [i for i, e in enumerate(examples) for _ in e.candidates]
    picks = [(i, len(seqs[i]) - 1, c[0]) for i, c in zip(rows, cont_ids, strict=True)]
    return _score_batch(seqs, picks, list(range(len(picks))), tokenizer.pad_token_id)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def mean_logprobs(model: PreTrainedModel, batch: ScoreBatch) -> torch.Tensor:
    """Each candidate's mean token log-probability, (N,), from one forward of the batch.

    Differentiable (the classification objective backpropagates through it); only positions
    from ``batch.first`` on are projected onto the vocabulary when the model takes
    ``logits_to_keep``. The result lives on the device of the model's logits.
    """
    batch = batch.to(next(model.parameters()).device)
    width = batch.input_ids.shape[1]
    kwargs = {"logits_to_keep": width - batch.first} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs
    ).logits  # (R, K, V): logits[:, k] belongs to position width - K + k
    offset = width - logits.shape[1]
    rows, cols = batch.rows.to(logits.device), batch.cols.to(logits.device) - offset
    picked = logits[rows, cols].float().log_softmax(-1)  # (P, V)
    token_lp = picked.gather(-1, batch.tokens.to(logits.device)[:, None]).squeeze(-1)  # (P,)
    owner, counts = batch.owner.to(logits.device), batch.counts.to(logits.device)
    sums = token_lp.new_zeros(len(counts)).index_add(0, owner, token_lp)
    return sums / counts


@torch.inference_mode()
def candidate_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    continuations: list[str],
    max_length: int = 1024,
) -> torch.Tensor:
    """Mean log-probability of each continuation's tokens given its prompt, (N,), one forward."""
    batch = encode_continuations(tokenizer, prompts, continuations, max_length)
    return mean_logprobs(model, batch).cpu()


@torch.inference_mode()
def example_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int = 1024,
) -> list[list[float]]:
    """Per example, the mean log-probability of each candidate (one forward for the batch)."""
    flat = mean_logprobs(model, encode_candidates(tokenizer, examples, max_length)).tolist()
    out, at = [], 0
    for e in examples:
        out.append(flat[at : at + len(e.candidates)])
        at += len(e.candidates)
    return out


# --------------------------------------------------------------------------- evaluation


def _chunks(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _classify(model, tokenizer, batch: Sequence[Example], max_length: int) -> list[int]:
    scores = example_scores(model, tokenizer, batch, max_length)
    return [max(range(len(group)), key=group.__getitem__) for group in scores]


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 32,
    max_length: int = 1024,
) -> list[str]:
    """Greedy answers for a batch of prompts (left padded), cut at the first newline."""
    if max_new_tokens >= max_length:
        raise TaskError(
            f"max_new_tokens={max_new_tokens} leaves no room in max_length={max_length}"
        )
    keep, bos = max_length - max_new_tokens, tokenizer.bos_token_id
    ids = [_cut_prompt(p, keep, bos) for p in tokenizer(prompts)["input_ids"]]
    width = max(len(p) for p in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(ids):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=[ANSWER_END],
    )
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        tokenizer=tokenizer,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.split(ANSWER_END)[0].strip() for t in texts]


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    progress: bool = True,
    max_length: int = 1024,
    max_new_tokens: int = 32,
    return_predictions: bool = False,
) -> dict:
    """Score ``examples`` (all of one kind) and return the metrics.

    Classification: ``{"accuracy", "n"}``; generation: ``{"f1", "exact_match", "n"}`` (F1 and
    EM in [0, 1]). With ``return_predictions`` also ``"predictions"``: the predicted candidate
    indices or answer strings. The model is put in eval mode and restored afterwards.
    """
    if not examples:
        raise TaskError("evaluate needs at least one example")
    kinds = {e.kind for e in examples}
    if len(kinds) > 1:
        raise TaskError("evaluate got a mix of classification and generation examples")
    was_training = model.training
    model.eval()
    preds: list = []
    try:
        with Progress(transient=True, disable=not progress, console=Console(stderr=True)) as bar:
            job = bar.add_task(f"evaluating {len(examples)} examples", total=len(examples))
            for batch in _chunks(examples, batch_size):
                if "classification" in kinds:
                    preds += _classify(model, tokenizer, batch, max_length)
                else:
                    prompts = [e.prompt for e in batch]
                    preds += generate_answers(model, tokenizer, prompts, max_new_tokens, max_length)
                bar.advance(job, len(batch))
    finally:
        model.train(was_training)
    result = _score(examples, preds)
    if return_predictions:
        result["predictions"] = preds
    return result


def _score(examples: Sequence[Example], preds: list) -> dict:
    n = len(examples)
    pairs = list(zip(preds, examples, strict=True))
    if examples[0].candidates is not None:
        return {"accuracy": sum(p in e.correct for p, e in pairs) / n, "n": n}
    f1 = sum(max(token_f1(p, r) for r in e.references) for p, e in pairs)
    em = sum(max(exact_match(p, r) for r in e.references) for p, e in pairs)
    return {"f1": f1 / n, "exact_match": em / n, "n": n}
