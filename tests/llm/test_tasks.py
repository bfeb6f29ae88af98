"""The task registry: examples, training batches, evaluation, metrics, task sources, assets."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from llm import assets
from llm.models import load_model
from llm.tasks import (
    DEFAULT_MAX_LENGTH,
    LONG_MAX_LENGTH,
    Example,
    TaskError,
    candidate_scores,
    evaluate,
    exact_match,
    example_scores,
    list_tasks,
    load_task,
    loss_batch,
    scoring,
    token_f1,
)
from llm.tasks import mezo_suite as suite

SENTIMENT = ["movie-reviews", "tweets", "amazon-reviews", "nyt-editorials"]


def _sentiment(text: str, label: int) -> Example:
    return Example(f"{text} It was", [" terrible", " great"], label)


# --------------------------------------------------------------------------- examples, batches


def test_example_validation():
    with pytest.raises(TaskError, match="out of range"):
        Example("p", [" a", " b"], 2)
    with pytest.raises(TaskError, match="int answer"):
        Example("p", [" a"], "a")
    assert Example("p", None, " x").references == [" x"]
    assert Example("p", [" a", " b"], 1).target == " b"


def test_loss_batch_masks_everything_but_the_gold_tokens(tiny_model):
    _, tok = tiny_model
    examples = [_sentiment("A fine film.", 1), _sentiment("Bad.", 0), Example("Q:", None, " 42")]
    batch = loss_batch(examples, tok)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    for i, (ex, cont) in enumerate(zip(examples, [" great", " terrible", " 42\n"], strict=True)):
        prompt = tok(ex.prompt)["input_ids"]
        gold = tok(cont, add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(gold)
        assert ids[i, :n].tolist() == prompt + gold
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padded
        assert labels[i, len(prompt) : n].tolist() == gold
        assert (labels[i, : len(prompt)] == -100).all() and (labels[i, n:] == -100).all()


def test_loss_is_mean_nll_of_gold_tokens(tiny_model):
    model, tok = tiny_model
    batch = loss_batch([_sentiment("Great fun.", 1), _sentiment("Dull and slow.", 0)], tok)
    logp = model(input_ids=batch["input_ids"]).logits.log_softmax(-1)
    nll = [
        -logp[i, t - 1, batch["labels"][i, t]]
        for i in range(2)
        for t in range(batch["labels"].shape[1])
        if batch["labels"][i, t] != -100
    ]
    assert torch.allclose(model(**batch).loss, torch.stack(nll).mean(), atol=1e-5)


def test_truncation_keeps_the_answer(tiny_model):
    _, tok = tiny_model
    batch = loss_batch([_sentiment("word " * 300, 1)], tok, max_length=32)
    assert batch["input_ids"].shape[1] == 32
    assert batch["labels"][0, -1] == tok(" great", add_special_tokens=False)["input_ids"][0]


# --------------------------------------------------------------------------- evaluation


def test_candidate_scores_are_mean_logprobs_and_batch_independent(tiny_model):
    model, tok = tiny_model
    prompts = ["It was", "The story was long and the actors were slow. It was", "Yes or No?\n"]
    conts = [" great", " terrible and boring", "Yes"]
    batched = candidate_scores(model, tok, prompts, conts)
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        p_ids, c_ids = tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]
        logp = model(torch.tensor([p_ids + c_ids])).logits[0].log_softmax(-1)
        want = torch.stack([logp[len(p_ids) + j - 1, t] for j, t in enumerate(c_ids)]).mean()
        assert torch.allclose(batched[i], want, atol=1e-5), (p, c)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_single_token_fast_path_matches_the_general_path(name):
    model, tok = load_model(name)
    examples = [_sentiment("Fun.", 1), _sentiment("A long and very boring film.", 0)]
    examples.append(Example("Is it true? Yes or No?\n", ["Yes", "No", " great"], 2))
    fast = example_scores(model, tok, examples)  # every candidate is one token here
    prompts = [e.prompt for e in examples for _ in e.candidates]
    conts = [c for e in examples for c in e.candidates]
    slow = candidate_scores(model, tok, prompts, conts)
    assert all(len(ids) == 1 for ids in tok(conts, add_special_tokens=False)["input_ids"])
    assert [len(g) for g in fast] == [2, 2, 3]
    assert torch.allclose(torch.tensor(sum(fast, [])), slow, atol=1e-5)


class FavouriteToken(torch.nn.Module):
    """A stub LM that always puts almost all probability on one token."""

    def __init__(self, vocab_size: int, token_id: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.token_id = vocab_size, token_id

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.token_id] = 20.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_evaluate_scores_a_perfect_and_a_wrong_model(tiny_model):
    _, tok = tiny_model
    great = tok(" great", add_special_tokens=False)["input_ids"][0]
    stub = FavouriteToken(len(tok), great)
    all_great = [_sentiment(f"Review {i}.", 1) for i in range(5)]
    all_bad = [_sentiment(f"Review {i}.", 0) for i in range(5)]
    assert evaluate(stub, tok, all_great, batch_size=2, progress=False)["accuracy"] == 1.0
    assert evaluate(stub, tok, all_bad, batch_size=2, progress=False)["accuracy"] == 0.0
    mixed = evaluate(stub, tok, all_great[:3] + all_bad[:1], progress=False)
    assert mixed == {"accuracy": 0.75, "n": 4}


def test_evaluate_tiny_model_classification_and_generation(tiny_model):
    model, tok = tiny_model
    model.train()
    examples = [_sentiment(f"Film number {i} was shown.", i % 2) for i in range(10)]
    result = evaluate(model, tok, examples, batch_size=4, progress=False, return_predictions=True)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 10
    assert set(result["predictions"]) <= {0, 1}
    assert model.training, "evaluate must restore the training flag"
    gen = [Example("Question: who? Answer:", None, " Bob"), Example("Q: where?\n", None, "here")]
    out = evaluate(model, tok, gen, progress=False, max_new_tokens=4, return_predictions=True)
    assert out["n"] == 2 and all(isinstance(p, str) and "\n" not in p for p in out["predictions"])
    with pytest.raises(TaskError, match="mix"):
        evaluate(model, tok, examples[:1] + gen[:1], progress=False)


def test_generation_metrics_use_the_best_reference(monkeypatch, tiny_model):
    model, tok = tiny_model
    answers = iter([["Paris", "the cat sat"]])
    monkeypatch.setattr(scoring, "generate_answers", lambda *a, **k: next(answers))
    examples = [
        Example("Capital?", None, " Paris", references=["Paris", "paris city"]),
        Example("Cat?", None, " a cat sat down", references=["a cat sat down", "dog"]),
    ]
    out = evaluate(model, tok, examples, progress=False)
    assert out["exact_match"] == 0.5
    assert out["f1"] == pytest.approx((1.0 + 0.8) / 2)


@pytest.mark.parametrize(
    ("pred", "ref", "f1", "em"),
    [
        ("The Cat!", "cat", 1.0, 1.0),
        ("the cat sat", "a cat sat down", 0.8, 0.0),  # P = 1, R = 2/3
        ("dog", "cat", 0.0, 0.0),
        ("", "", 1.0, 1.0),
        ("", "cat", 0.0, 0.0),
        ("1 2 2", "2 2 3", 2 / 3, 0.0),  # counts overlap with multiplicity
    ],
)
def test_token_f1_and_exact_match(pred, ref, f1, em):
    assert token_f1(pred, ref) == pytest.approx(f1)
    assert exact_match(pred, ref) == em


# --------------------------------------------------------------------------- local files


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_classification_with_string_labels(tmp_path):
    rows = [{"text": f"t{i}", "label": ["pos", "neg", "neutral"][i % 3]} for i in range(30)]
    task = load_task(str(_jsonl(tmp_path / "d.jsonl", rows)))
    assert (task.kind, task.metric) == ("classification", "accuracy")
    assert (len(task.train), len(task.dev), len(task.test)) == (24, 3, 3)
    ex = task.train[0]
    assert ex.candidates == [" neg", " neutral", " pos"]  # sorted label set
    number = int(ex.prompt.split("\n")[0][1:])
    assert ex.prompt == f"t{number}\nQuestion: neg, neutral or pos?\nAnswer:"  # the default
    assert ex.candidates[ex.answer] == " " + rows[number]["label"]
    assert (task.objective, task.max_length) == ("classification", DEFAULT_MAX_LENGTH)


def test_local_int_labels_sort_numerically_and_candidates_column(tmp_path):
    rows = [{"text": f"t{i}", "label": [2, 10, 1][i % 3]} for i in range(9)]
    task = load_task(_jsonl(tmp_path / "n.jsonl", rows), n_train=100)
    assert task.train[0].candidates == [" 1", " 2", " 10"]
    csv_file = tmp_path / "c.csv"
    csv_file.write_text(
        "text,label,candidates,split\nIs it?,yes,no|yes,train\nReally?,0,no|yes,test\n"
    )
    task = load_task(str(csv_file))
    assert (task.train[0].candidates, task.train[0].answer) == ([" no", " yes"], 1)
    assert task.test[0].answer == 0 and task.dev == []


def test_local_generation_and_split_column(tmp_path):
    rows = [
        {"prompt": "Q: capital? A:", "answer": ["Paris", "paris"], "split": "train"},
        {"prompt": "Q: two plus two?\n", "answer": 4, "split": "validation"},
        {"prompt": "Q: sky? A:", "answer": "blue", "split": "test"},
    ]
    task = load_task(_jsonl(tmp_path / "g.jsonl", rows))
    assert (task.kind, task.metric, task.objective) == ("generation", "f1", "lm")
    assert task.train[0].answer == " Paris" and task.train[0].references == ["Paris", "paris"]
    assert task.dev[0].answer == "4"  # the prompt already ends with whitespace
    assert task.test[0].references == ["blue"]


def test_local_split_is_fixed_and_seed_only_subsamples(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(200)])
    a, b = load_task(path, seed=0, n_train=50), load_task(path, seed=1, n_train=50)
    a2 = load_task(path, seed=0, n_train=50)
    assert [e.prompt for e in a.test] == [e.prompt for e in b.test]
    assert [e.prompt for e in a.train] == [e.prompt for e in a2.train]
    assert [e.prompt for e in a.train] != [e.prompt for e in b.train]
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.test}


def test_local_file_errors(tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "x", "lable": 1}])
    with pytest.raises(TaskError, match=r"no column 'label'.*columns \['text', 'lable'\]"):
        load_task(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0\n')
    with pytest.raises(TaskError, match="broken.jsonl line 3: malformed JSON"):
        load_task(broken)
    split = _jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": 1, "split": "holdout"}])
    with pytest.raises(TaskError, match="s.jsonl line 1: split 'holdout'"):
        load_task(split)
    with pytest.raises(TaskError, match="does not exist"):
        load_task(tmp_path / "missing.csv")
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("text,label,candidates\nIs it?,maybe,no|yes\n")
    with pytest.raises(TaskError, match="c.csv line 2: label 'maybe'"):
        load_task(csv_file)


def _reviews(path, extra=None, n=10):
    rows = [{"text": f"Review {i}.", "label": ["negative", "positive"][i % 2]} for i in range(n)]
    return _jsonl(path, [dict(r, **(extra or {})) for r in rows])


def test_local_template_and_label_words_from_keywords(tmp_path):
    path = _reviews(tmp_path / "r.jsonl")
    task = load_task(
        path, template="{text} It was", label_words="positive=great, negative=terrible"
    )
    ex = next(e for e in task.train if e.prompt == "Review 1. It was")
    assert (ex.candidates, ex.target) == ([" terrible", " great"], " great")
    as_dict = load_task(
        path, template="{text} It was", label_words={"positive": "great"} | {"negative": "terrible"}
    )
    assert [e.candidates for e in as_dict.train] == [e.candidates for e in task.train]
    asked = load_task(path, template="{text}\nIs it {options}? Answer:\n")
    ex = next(e for e in asked.train if e.prompt.startswith("Review 1."))
    assert ex.prompt == "Review 1.\nIs it negative or positive? Answer:\n"
    assert ex.candidates == ["negative", "positive"]  # after whitespace: no extra space
    assert ex.target == "positive"


def test_local_template_names_other_columns(tmp_path):
    path = _reviews(tmp_path / "r.jsonl", {"product": "kettle"})
    task = load_task(path, template="About the {product}: {text} All in all it was")
    assert task.train[0].prompt.startswith("About the kettle: Review ")
    with pytest.raises(TaskError, match=r"r.jsonl line \d+: the template .* needs column 'title'"):
        load_task(path, template="{title}: {text}")


def test_local_template_and_label_words_from_columns(tmp_path):
    path = _reviews(tmp_path / "r.jsonl", {"template": "{text} Verdict:"})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["label_words"] = {"positive": "good", "negative": "bad"}
    _jsonl(path, rows)
    task = load_task(path, n_train=100)
    by_prompt = {e.prompt: e for e in task.train + task.dev + task.test}
    assert by_prompt["Review 1. Verdict:"].candidates == [" bad", " good"]
    assert by_prompt["Review 3. Verdict:"].candidates == [" negative", " positive"]
    keyword = load_task(path, template="{text} It was", label_words="positive=a,negative=b")
    assert {e.prompt[-6:] for e in keyword.train} == {"It was"}  # keywords win
    assert {tuple(e.candidates) for e in keyword.train} == {(" b", " a")}
    csv_file = tmp_path / "r.csv"
    csv_file.write_text(
        "text,label,label_words,split\nNice.,pos,pos great,train\n"
        'Bad.,neg,"pos=great,neg=terrible",train\n'
    )
    with pytest.raises(TaskError, match=r"r.csv line 2: column 'label_words'.*label=word"):
        load_task(csv_file)
    csv_file.write_text(
        'text,label,label_words,split\nNice.,pos,"pos=great,neg=bad",train\n'
        'Bad.,neg,"pos=great,neg=terrible",test\n'
    )
    task = load_task(csv_file)
    assert task.train[0].prompt == "Nice.\nQuestion: bad or great?\nAnswer:"
    assert (task.train[0].candidates, task.test[0].target) == ([" bad", " great"], " terrible")


def test_local_template_and_label_word_errors(tmp_path):
    path = _reviews(tmp_path / "r.jsonl")
    with pytest.raises(TaskError, match=r"--label_words: .*'positive=great,negative=terrible'"):
        load_task(path, label_words="positive:great")
    with pytest.raises(TaskError, match=r"no word for label\(s\) \['negative'\]"):
        load_task(path, label_words="positive=great")
    with pytest.raises(TaskError, match=r"names label\(s\) \['postive'\].*\['negative', 'pos"):
        load_task(path, label_words="postive=great,positive=fine,negative=bad")
    with pytest.raises(TaskError, match="two labels one word"):
        load_task(path, label_words="positive=ok,negative=ok")
    with pytest.raises(TaskError, match=r"--template: template 'It was' names no column"):
        load_task(path, template="It was")
    with pytest.raises(TaskError, match="must name columns in braces"):
        load_task(path, template="{} was")
    with pytest.raises(TaskError, match="malformed template"):
        load_task(path, template="{text was")
    with pytest.raises(TaskError, match="tweets has its own prompt; --template and --label_words"):
        load_task("tweets", template="{text} It was")
    gen = _jsonl(tmp_path / "g.jsonl", [{"prompt": "Q:", "answer": "a"}])
    with pytest.raises(TaskError, match="g.jsonl is a generation file"):
        load_task(gen, label_words="a=b")


def test_unknown_task_lists_close_names():
    with pytest.raises(TaskError, match="did you mean movie-reviews") as err:
        load_task("movie-review")
    assert "sst2" in str(err.value) and ".jsonl" in str(err.value)
    assert set(SENTIMENT) | {"sst2", "squad", "drop", "copa"} <= set(list_tasks())


# --------------------------------------------------------------------------- MeZO suite


def test_mezo_to_example_functions():
    ex = suite.sst2_example({"sentence": "a gorgeous film ", "label": 1, "idx": 0})
    assert (ex.prompt, ex.target) == ("a gorgeous film It was", " great")
    assert suite.sst2_example({"sentence": "unlabelled", "label": -1}) is None
    rte = suite.rte_example({"premise": "P.", "hypothesis": "H.", "label": 1})
    assert rte.prompt == 'P.\nDoes this mean that "H." is true? Yes or No?\n' and rte.target == "No"
    cb = suite.cb_example({"premise": "It rained.", "hypothesis": "It was wet", "label": 2})
    assert cb.prompt == 'Suppose It rained. Can we infer that "It was wet"? Yes, No, or Maybe?\n'
    assert (cb.candidates, cb.target) == (["Yes", "No", "Maybe"], "Maybe")
    boolq = suite.boolq_example({"passage": "Sky.", "question": "is the sky blue", "label": 1})
    assert (boolq.prompt, boolq.target) == ("Sky. Is the sky blue?\n", "Yes")
    asked = suite.boolq_example({"passage": "Sky.", "question": "is it blue?", "label": 0})
    assert (asked.prompt, asked.target) == ("Sky. Is it blue?\n", "No")
    wsc = suite.wsc_example(
        {"text": "Bob met Al. He smiled.", "span1_text": "Bob", "span2_text": "He", "label": 0}
    )
    assert 'pronoun "he" refer to Bob?' in wsc.prompt and wsc.target == "No"
    wic = suite.wic_example({"word": "bank", "sentence1": "A", "sentence2": "B", "label": 1})
    assert wic.prompt.endswith("Yes, No?\nA\nB\n") and wic.target == "Yes"
    row = {"paragraph": "Par.", "question": "Q?", "answer": "Ans", "label": 1}
    assert 'I found this answer "Ans".' in suite.multirc_example(row).prompt
    copa_row = {"premise": "The man broke his toe.", "choice1": "He dropped a hammer."}
    copa_row |= {"choice2": "He ran.", "question": "cause", "label": 0}
    copa = suite.copa_example(copa_row)
    assert copa.prompt == "The man broke his toe because"
    assert copa.candidates == [" he dropped a hammer.", " he ran."] and copa.answer == 0
    assert (
        suite.copa_example({**copa_row, "question": "effect"}).prompt == "The man broke his toe so"
    )
    mine = suite.copa_example({**copa_row, "choice1": "I fell.", "choice2": "The NASA van left."})
    assert mine.candidates == [" I fell.", " the NASA van left."]  # MeZO: "I" stays upper case
    contracted = suite.copa_example({**copa_row, "choice1": "I'm ill.", "choice2": "It's late."})
    assert contracted.candidates == [" I'm ill.", " it's late."]


def test_mezo_record_squad_drop_examples():
    record = suite.record_example(
        {
            "passage": "Text.\n@highlight\nMerkel visits Paris",
            "query": "@placeholder said hi",
            "entities": ["Merkel", "Paris", "Merkel"],
            "answers": ["Paris"],
        }
    )
    assert record.prompt == "Text.\n- Merkel visits Paris\n-"
    assert record.candidates == [" Merkel said hi", " Paris said hi"] and record.answer == 1
    assert record.correct == [1]
    squad = suite.squad_example(
        {"title": "T", "context": "C", "question": "Q?", "answers": {"text": ["x", "the x"]}}
    )
    assert squad.prompt == "Title: T\nContext: C\nQuestion: Q?\nAnswer:"
    assert (squad.candidates, squad.answer, squad.references) == (None, " x", ["x", "the x"])
    drop = suite.drop_example({"passage": "P", "question": "Q", "answers_spans": {"spans": ["3"]}})
    assert drop.prompt == "Passage: P\nQuestion: Q\nAnswer:" and drop.answer == " 3"
    assert (
        suite.drop_example({"passage": "P", "question": "Q", "answers_spans": {"spans": []}})
        is None
    )


def test_hub_task_sampling_follows_mezo(monkeypatch):
    import datasets

    def fake_load(path, config, split):
        n = {"train": 400, "validation": 100}[split]
        return [{"sentence": f"{split} {i}", "label": i % 2} for i in range(n)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    task = load_task("SST-2", n_train=1000, n_dev=500)
    assert (len(task.train), len(task.dev), len(task.test)) == (300, 100, 100)  # small pool
    assert all(e.prompt.startswith("train") for e in task.train + task.dev)
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.dev}
    other = load_task("sst2", seed=1, n_train=50, n_dev=20, n_test=30)
    same = load_task("sst2", seed=0, n_train=50, n_dev=20, n_test=30)
    assert (len(other.train), len(other.dev), len(other.test)) == (50, 20, 30)
    assert [e.prompt for e in other.test] == [e.prompt for e in same.test]


def _fake_hub(monkeypatch, rows_by_split):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda path, config, split: rows_by_split[split])


def test_cb_and_copa_get_mezos_100_example_dev_split(monkeypatch):
    cb = [{"premise": f"P{i}.", "hypothesis": "H", "label": i % 3} for i in range(250)]
    _fake_hub(monkeypatch, {"train": cb, "validation": cb[:56]})
    task = load_task("cb")
    assert (len(task.train), len(task.dev), len(task.test)) == (150, 100, 56)
    assert task.dev[0].prompt.startswith("Suppose P")
    assert len(load_task("cb", n_dev=20).dev) == 20
    copa = [{"premise": f"P{i}.", "choice1": "A.", "choice2": "B.", "question": "cause"}
            for i in range(400)]  # fmt: skip
    _fake_hub(monkeypatch, {"train": [dict(r, label=0) for r in copa], "validation": []})
    task = load_task("copa")
    assert (len(task.train), len(task.dev), task.objective) == (300, 100, "lm")
    assert len(load_task("copa", n_dev=50).dev) == 50  # a smaller request is kept


def test_long_passage_tasks_default_to_mezos_max_length(monkeypatch):
    long = {n for n, spec in suite.MEZO_TASKS.items() if spec.max_length == LONG_MAX_LENGTH}
    assert long == {"multirc", "record", "squad", "drop"} and LONG_MAX_LENGTH == 2048
    rows = [{"paragraph": "P.", "question": "Q?", "answer": "A", "label": 1}] * 4
    _fake_hub(monkeypatch, {"train": rows, "validation": rows})
    assert load_task("multirc").max_length == LONG_MAX_LENGTH
    _fake_hub(monkeypatch, {"train": [{"sentence": "s", "label": 1}] * 4, "validation": []})
    assert load_task("sst2").max_length == DEFAULT_MAX_LENGTH


def test_record_is_right_on_any_gold_entity(tiny_model):
    _, tok = tiny_model
    row = {
        "passage": "Merkel met Macron in Paris.",
        "query": "@placeholder said hi",
        "entities": ["Merkel", "Macron", "Paris", "Macron"],
        "answers": ["Macron", "Merkel", "Macron", "Berlin"],
    }
    record = suite.record_example(row)
    assert record.candidates == [" Merkel said hi", " Macron said hi", " Paris said hi"]
    assert (record.answer, record.correct) == (1, [0, 1])  # target: the first gold answer
    assert suite.record_example({**row, "answers": ["Berlin"]}) is None
    merkel = tok(" Merkel", add_special_tokens=False)["input_ids"][0]
    stub = FavouriteToken(len(tok), merkel)  # predicts the other gold entity
    assert evaluate(stub, tok, [record], progress=False)["accuracy"] == 1.0
    wrong = Example(record.prompt, record.candidates, 1, references=[" Macron said hi"])
    assert evaluate(stub, tok, [wrong], progress=False)["accuracy"] == 0.0


def test_hub_task_unreachable_names_the_dataset_and_offline_tasks(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskError, match=r"task sst2 needs the Hub dataset nyu-mll/glue/sst2") as e:
        load_task("sst2")
    assert "movie-reviews" in str(e.value) and "Couldn't reach" in str(e.value)


# --------------------------------------------------------------------------- sentiment data


def test_parse_ground_truth_threshold_duplicates_and_entities():
    text = "1\t2.5\tGood &amp; fun\r\n2\t0.4\tmeh\r\n3\t-0.5\tBad\r\n4\t1.0\tgood  &amp; FUN\r\n"
    text += "5\t-1.2\tsplit\n6\t0.9\tSplit\n"
    rows = assets.parse_ground_truth(text, source="x.txt")
    assert [(r["id"], r["text"], r["label"]) for r in rows] == [
        ("1", "Good & fun", 1),
        ("3", "Bad", 0),
    ]  # 2 is neutral, 4 duplicates 1, 5/6 disagree
    with pytest.raises(assets.AssetError, match="x.txt line 2"):
        assets.parse_ground_truth("1\t1.0\tok\nbroken line\n", source="x.txt")


def test_split_rows_is_deterministic_and_disjoint():
    rows = [{"id": str(i)} for i in range(100)]
    a, b = assets.split_rows(rows, "t"), assets.split_rows(rows, "t")
    assert {k: len(v) for k, v in a.items()} == {"train": 70, "dev": 10, "test": 20}
    assert a == b and assets.split_rows(rows, "other") != a
    assert len({r["id"] for split in a.values() for r in split}) == 100


def test_staging_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), assets._staging(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_is_reported_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_HOME", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(assets.AssetError, match="could not download vadersentiment") as err:
        assets.ensure_sentiment_data()
    assert "No matching distribution" in str(err.value) and "PIP_INDEX_URL" in str(err.value)


def test_sentiment_data_builds_from_pypi_once(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_HOME", str(tmp_path))
    root = assets.ensure_sentiment_data()
    assert root == tmp_path / "data" and sorted(p.name for p in root.iterdir()) == sorted(SENTIMENT)
    meta = json.loads((root / "movie-reviews" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 7049, "dev": 1007, "test": 2014}
    row = json.loads((root / "tweets" / "test.jsonl").read_text().splitlines()[0])
    assert set(row) == {"id", "text", "score", "label"} and abs(row["score"]) >= 0.5
    stamp = (root / "tweets" / "train.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(assets.subprocess, "run", None)  # a second call must not run pip
    assert assets.ensure_sentiment_data() == root
    assert (root / "tweets" / "train.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", SENTIMENT)
def test_sentiment_tasks(name):
    task = load_task(name, n_train=64, n_dev=16, n_test=32)
    assert (len(task.train), len(task.dev), len(task.test)) == (64, 16, 32)
    ex = task.test[0]
    assert ex.prompt.endswith(" It was") and ex.candidates == [" terrible", " great"]
    again = load_task(name, seed=1, n_train=64, n_dev=16, n_test=32)
    assert [e.prompt for e in again.test] == [e.prompt for e in task.test]
    assert [e.prompt for e in again.train] != [e.prompt for e in task.train]


def _ensure_data_in_child(home: str, together) -> None:
    os.environ["L2L_HOME"] = home
    together.wait()  # both look for the data at the same moment
    assets.ensure_sentiment_data()


def test_runs_started_together_build_the_data_once(tmp_path, monkeypatch):
    """Two processes that find no data on a fresh machine: one builds, the other waits for it."""
    count = tmp_path / "builds.txt"

    def slow_build(root, missing):
        with open(count, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough for the other process to find the data missing
        for task in missing:
            with assets._staging(root / task) as tmp:
                for name in (assets.META_FILE, *(f"{s}.jsonl" for s in assets.SPLITS)):
                    (tmp / name).write_text("{}\n")

    monkeypatch.setattr(assets, "_build_sentiment", slow_build)
    ctx = multiprocessing.get_context("fork")  # the children inherit the patched builder
    together = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_ensure_data_in_child, args=(str(tmp_path), together)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(count.read_text().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(assets.SENTIMENT_FILES)
