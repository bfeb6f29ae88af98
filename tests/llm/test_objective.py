"""Training objectives: classification cross-entropy, LM loss, accuracy; auto resolution."""

from __future__ import annotations

import json

import pytest
import torch

from llm.tasks import (
    Example,
    Task,
    TaskError,
    example_scores,
    load_task,
    loss_batch,
    objective_batch,
    objective_loss,
    resolve_objective,
)
from llm.tasks import mezo_suite as suite
from llm.tasks import objective as objective_module

MULTI_TOKEN = [  # the general path: candidates of several tokens, 2 and 3 of them
    Example("The plot was slow and the actors were", [" terrible and bored", " great"], 1),
    Example("Is the sky blue? Yes, No or Maybe?\n", ["Yes", "No", "Maybe not today"], 0),
    Example("Bob ate the cake because", [" he was hungry", " it rained"], 0),
]
SINGLE_TOKEN = [  # the fast path: one row per example
    Example("A fine film. It was", [" terrible", " great"], 1),
    Example("Dull. It was", [" terrible", " great"], 0),
    Example("Is it? Yes or No?\n", ["Yes", "No", "Maybe"], 2),
]


def _hand_ce(scores: list[list[float]], examples: list[Example]) -> torch.Tensor:
    """-mean_b log(sum_{k correct} e^{s_bk} / sum_k e^{s_bk}), from evaluate's own scores."""
    per = [
        torch.tensor(s).logsumexp(0) - torch.tensor([s[k] for k in e.correct]).logsumexp(0)
        for s, e in zip(scores, examples, strict=True)
    ]
    return torch.stack(per).mean()


@pytest.mark.parametrize("examples", [MULTI_TOKEN, SINGLE_TOKEN], ids=["general", "fast"])
def test_classification_loss_is_cross_entropy_over_candidate_scores(tiny_model, examples):
    model, tok = tiny_model
    batch = objective_batch(examples, tok, "classification", max_length=64)
    with torch.no_grad():
        loss = objective_loss(model, batch)
    want = _hand_ce(example_scores(model, tok, examples, max_length=64), examples)
    assert loss.shape == () and torch.allclose(loss, want, atol=1e-5)
    assert batch.units == len(examples)


def test_several_correct_candidates_share_the_probability(tiny_model):
    model, tok = tiny_model
    one = Example("Merkel met Paris. Who said hi?", [" Merkel", " Paris", " Bob"], 0)
    two = Example(one.prompt, one.candidates, 0, references=[" Merkel", " Bob"])
    with torch.no_grad():
        l1 = objective_loss(model, objective_batch([one], tok, "classification", 64))
        l2 = objective_loss(model, objective_batch([two], tok, "classification", 64))
    s = torch.tensor(example_scores(model, tok, [one])[0])
    assert torch.allclose(l1, s.logsumexp(0) - s[0], atol=1e-5)
    assert torch.allclose(l2, s.logsumexp(0) - s[[0, 2]].logsumexp(0), atol=1e-5)
    assert l2 < l1


def test_one_forward_per_loss(tiny_model):
    model, tok = tiny_model
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    with torch.no_grad():
        objective_loss(model, objective_batch(MULTI_TOKEN, tok, "classification", 64))
        objective_loss(model, objective_batch(SINGLE_TOKEN, tok, "accuracy", 64))
    assert len(calls) == 2


def test_gradient_of_the_classification_loss_raises_the_gold_score(tiny_model):
    """With two candidates dL/dtheta = p_other (ds_other - ds_gold), so a small step against
    it widens the gold candidate's margin s_gold - s_other (by lr p_other |ds_gold - ds_other|^2
    to first order): the score the evaluation argmaxes moves towards the gold answer."""
    model, tok = tiny_model
    example = MULTI_TOKEN[0]  # gold = candidate 1 of 2
    batch = objective_batch([example], tok, "classification", 64)
    before = torch.tensor(example_scores(model, tok, [example])[0])
    loss = objective_loss(model, batch)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    assert params and all(torch.isfinite(p.grad).all() for p in params)
    with torch.no_grad():
        for p in params:
            p -= 0.01 * p.grad
    after = torch.tensor(example_scores(model, tok, [example])[0])
    assert after[1] - after[0] > before[1] - before[0]
    with torch.no_grad():
        assert objective_loss(model, batch) < loss


def test_lm_objective_is_the_gold_continuation_loss(tiny_model):
    model, tok = tiny_model
    examples = MULTI_TOKEN + [Example("Q: capital of France? A:", None, " Paris")]
    batch = objective_batch(examples, tok, "lm", 64)
    plain = loss_batch(examples, tok, 64)
    with torch.no_grad():
        assert torch.equal(objective_loss(model, batch), model(**plain).loss)
    assert batch.units == int((plain["labels"][:, 1:] != -100).sum())


def test_accuracy_objective_is_one_minus_the_evaluated_accuracy(tiny_model):
    model, tok = tiny_model
    examples = MULTI_TOKEN + SINGLE_TOKEN[:2]
    scores = example_scores(model, tok, examples)
    pairs = zip(scores, examples, strict=True)
    hits = [max(range(len(s)), key=s.__getitem__) in e.correct for s, e in pairs]
    with torch.no_grad():
        loss = objective_loss(model, objective_batch(examples, tok, "accuracy", 64))
    assert 0 < sum(hits) < len(hits) and 2 * sum(hits) != len(hits), (
        "pick examples that the tiny model gets partly right, not half"
    )
    assert float(loss) == pytest.approx(1 - sum(hits) / len(hits))


def test_accuracy_objective_for_generation_is_one_minus_f1(tiny_model, monkeypatch):
    model, tok = tiny_model
    examples = [
        Example("Capital?", None, " Paris", references=["Paris", "paris city"]),
        Example("Cat?", None, " a cat sat down", references=["a cat sat down", "dog"]),
    ]
    monkeypatch.setattr(objective_module, "generate_answers", lambda *a: ["Paris", "the cat sat"])
    batch = objective_batch(examples, tok, "accuracy", 64)
    assert batch.units == 2
    assert float(objective_loss(model, batch)) == pytest.approx(1 - (1.0 + 0.8) / 2)


def test_objective_batch_moves_to_a_device_and_refuses_bad_requests(tiny_model):
    _, tok = tiny_model
    batch = objective_batch(SINGLE_TOKEN, tok, "classification", 64).to("cpu")
    assert batch.scores.input_ids.device.type == "cpu"
    with pytest.raises(TaskError, match="not resolved"):
        objective_batch(SINGLE_TOKEN, tok, "auto", 64)
    with pytest.raises(TaskError, match="needs examples with candidates"):
        objective_batch([Example("Q:", None, " a")], tok, "classification", 64)
    with pytest.raises(TaskError, match="mix of classification and generation"):
        objective_batch(SINGLE_TOKEN + [Example("Q:", None, " a")], tok, "accuracy", 64)


# --------------------------------------------------------------------------- auto resolution


def _task(name: str, kind: str, objective: str | None = None) -> Task:
    return Task(name, kind, [], [], [], "accuracy", objective=objective)


def test_auto_resolves_per_task_kind(tmp_path):
    assert resolve_objective("auto", load_task("tweets", n_train=4, n_dev=1, n_test=1)) == (
        "classification"
    )
    cls = tmp_path / "c.jsonl"
    cls.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(5)))
    gen = tmp_path / "g.jsonl"
    gen.write_text(json.dumps({"prompt": "Q:", "answer": "a"}) + "\n")
    assert resolve_objective("auto", load_task(cls)) == "classification"
    assert resolve_objective("auto", load_task(gen)) == "lm"
    # MeZO's mezo.sh: COPA, ReCoRD, SQuAD, DROP train on the LM loss, the rest as classification
    lm = {name for name, spec in suite.MEZO_TASKS.items() if spec.objective == "lm"}
    assert lm == {"copa", "record"}
    assert {n for n, s in suite.MEZO_TASKS.items() if s.kind == "generation"} == {"squad", "drop"}
    assert _task("squad", "generation").objective == "lm"
    assert _task("sst2", "classification").objective == "classification"


def test_resolve_objective_checks_the_request():
    sst2, copa = _task("sst2", "classification"), _task("copa", "classification", "lm")
    squad = _task("squad", "generation")
    assert resolve_objective("auto", [sst2, sst2]) == "classification"
    assert resolve_objective("classification", [sst2, copa]) == "classification"
    assert resolve_objective("accuracy", squad) == "accuracy"
    with pytest.raises(TaskError, match=r"sst2 \(classification\), copa \(lm\).*--objective"):
        resolve_objective("auto", [sst2, copa])
    with pytest.raises(TaskError, match="squad is a generation task; use --objective lm"):
        resolve_objective("classification", [sst2, squad])
    with pytest.raises(TaskError, match="unknown objective 'ce'; use one of auto"):
        resolve_objective("ce", sst2)
