"""The meta-step's tuner gradient equals a finite-difference estimate of the meta-loss."""

from __future__ import annotations

import pytest
import torch

from l2l import ParamBlocks
from l2l.meta import MetaState, meta_step, scale_anchor
from l2l.scales import block_features
from l2l.z import gaussian_block


class LinearTuner(torch.nn.Module):
    """sigma_b = softplus(x_b . w + b0): a minimal differentiable block-scale network."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.05, 0.4], dtype=torch.float64))
        self.b0 = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        return torch.nn.functional.softplus(x.double() @ self.w + self.b0)


def test_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)  # a float64 MLP: HF models compute norms/losses in float32
    model = torch.nn.Sequential(
        torch.nn.Embedding(20, 8),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 16),
        torch.nn.Tanh(),
        torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 20),
    ).double()
    blocks = ParamBlocks.from_module(model)
    ids = torch.randint(0, 20, (16, 3), generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 20, (16,), generator=torch.Generator().manual_seed(1))

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(ids), target)

    tuner = LinearTuner()
    state = MetaState(loss_plus=5.0, loss_minus=5.1, sigma=torch.linspace(0.5, 1.5, len(blocks)))
    lr_update, seed = 0.5, 123
    theta0 = [p.detach().clone() for p in blocks.params]
    out = meta_step(model, blocks, tuner, loss_fn, state, seed=seed, eps=1e-3, lr_update=lr_update)
    for p, t in zip(blocks.params, theta0, strict=True):  # model is back at theta0, bit for bit
        assert torch.equal(p.detach(), t)
    analytic = torch.cat([tuner.w.grad, tuner.b0.grad.reshape(1)])
    nf = out.nf
    features = block_features(blocks, (5.0, 5.1), state.sigma)
    zs = [gaussian_block(seed, b, p).double() for b, p in enumerate(blocks.params)]

    def meta_loss(w, b0) -> float:  # L(theta0 - lr_update g nf sigma_b(w) z_b), g & nf constant
        sigma = torch.nn.functional.softplus(features.double() @ w + b0)
        with torch.no_grad():
            for b, p in enumerate(blocks.params):
                p.copy_(theta0[b] - lr_update * out.projected_grad * nf * sigma[b] * zs[b])
            value = float(loss_fn())
            for p, t in zip(blocks.params, theta0, strict=True):
                p.copy_(t)
        return value

    h = 1e-6
    numeric = []
    w, b0 = tuner.w.detach(), tuner.b0.detach()
    for i in range(6):
        step = torch.zeros(6, dtype=torch.float64)
        step[i] = h
        plus = meta_loss(w + step[:5], b0 + step[5])
        minus = meta_loss(w - step[:5], b0 - step[5])
        numeric.append((plus - minus) / (2 * h))
    numeric = torch.tensor(numeric, dtype=torch.float64)
    print("meta-gradient analytic", analytic.tolist(), "numeric", numeric.tolist())
    assert analytic.abs().max() > 1e-6  # a real signal, not zeros on both sides
    torch.testing.assert_close(analytic, numeric, rtol=1e-3, atol=1e-8)
    assert abs(float(out.meta_loss) - meta_loss(w, b0)) < 1e-9


def test_scale_anchor_measures_the_profile_of_the_scales_not_their_size():
    ref = torch.tensor([0.02, 1.0, 0.5, 0.03], dtype=torch.float64)
    assert float(scale_anchor(7.5 * ref, ref)) < 1e-24  # the overall size does not count
    moved = ref * torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    d = torch.log(torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    expected = float((d - d.mean()).square().sum())
    assert abs(float(scale_anchor(moved, ref)) - expected) < 1e-12
    assert abs(float(scale_anchor(3 * moved, ref)) - expected) < 1e-12


def test_the_anchor_adds_its_pull_to_the_tuner_gradient_and_nothing_else():
    """``meta_step(anchor=a, anchor_to=r)``: the tuner's gradient is the meta-gradient plus the
    gradient of ``a * scale_anchor(sigma, r)``; the model, the losses and the meta-loss are the
    same as without it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    blocks = ParamBlocks.from_module(model)
    x = torch.randn(10, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x), y)

    state = MetaState(loss_plus=1.0, loss_minus=1.2, sigma=torch.linspace(0.5, 1.5, len(blocks)))
    ref = torch.tensor([0.3, 1.0, 0.05, 2.0])
    grads, outs = [], []
    for anchor in (0.0, 0.7):
        tuner = LinearTuner()
        out = meta_step(
            model, blocks, tuner, loss_fn, state, seed=5, lr_update=0.3,
            anchor=anchor, anchor_to=ref,
        )  # fmt: skip
        grads.append(torch.cat([tuner.w.grad, tuner.b0.grad.reshape(1)]))
        outs.append(out)
    tuner = LinearTuner()
    pull = 0.7 * scale_anchor(tuner(block_features(blocks, (1.0, 1.2), state.sigma)), ref)
    pull.backward()
    expected = torch.cat([tuner.w.grad, tuner.b0.grad.reshape(1)])
    assert expected.abs().max() > 1e-3  # the pull is felt
    torch.testing.assert_close(grads[1] - grads[0], expected, rtol=1e-6, atol=1e-12)
    assert abs(outs[1].anchor_loss - float(pull)) < 1e-9 and outs[0].anchor_loss == 0.0
    assert float(outs[1].meta_loss) == float(outs[0].meta_loss)
    assert (outs[1].loss_plus, outs[1].loss_minus) == (outs[0].loss_plus, outs[0].loss_minus)
    with pytest.raises(ValueError, match="anchor_to"):
        meta_step(model, blocks, LinearTuner(), loss_fn, state, seed=5, anchor=0.1)


def test_reset_model_restores_theta0_clears_momentum_and_tuner_state():
    """ZO Fine-tuner's periodic reset (``--reset-every``), as MetaTunerModule does it."""
    from types import SimpleNamespace

    from l2l.tuner import Tuner
    from llm.models import load_model
    from pretrain_tuner.module import MetaTunerModule

    model, _ = load_model("tiny-llama")
    tuner = Tuner.for_blocks(ParamBlocks.from_module(model), "l2l/tiny-llama", seed=0)
    module = MetaTunerModule(model, tuner)
    module.configure_model()  # what Lightning calls first: takes theta_0
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = module.configure_optimizers()
    module.optimizers = lambda: SimpleNamespace(optimizer=opt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    first = module.blocks.params[0]
    opt.state[first]["momentum_buffer"] = torch.ones_like(first)
    module.meta_state = MetaState(1.0, 2.0, torch.ones(len(module.blocks)))

    module.reset_model()
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert first not in opt.state
    assert module.meta_state == MetaState()


def test_a_kept_z_gives_the_drawn_z_s_meta_step_with_one_draw_per_chunk(monkeypatch):
    """``keep_z`` draws each chunk of z once per meta-step instead of five times (two forwards,
    the shift, <grad, z>, the undo), and changes nothing: the same losses, tuner gradient,
    dL/dtheta1 and theta0 afterwards, bit for bit."""
    import l2l.meta as meta
    from l2l.tuner import Tuner
    from llm.models import load_model

    model, tok = load_model("tiny-llama")
    blocks = ParamBlocks.from_module(model)
    for p in blocks.params:
        p.requires_grad_(True)
    ids = tok(["a tiny example sentence", "another one here"], return_tensors="pt", padding=True)

    def loss_fn():
        return model(**ids, labels=ids.input_ids).loss

    theta0 = [p.detach().clone() for p in blocks.params]
    draws = []
    drawn = meta._z
    monkeypatch.setattr(meta, "_z", lambda *a: draws.append(a[2:]) or drawn(*a))
    runs = {}
    for keep in (False, True):
        tuner = Tuner.for_blocks(blocks, "l2l/tiny-llama", seed=0)
        draws.clear()
        state = MetaState(loss_plus=2.0, loss_minus=2.1)
        out = meta_step(model, blocks, tuner, loss_fn, state, seed=7, lr_update=1e-2, keep_z=keep)
        grads = [p.grad.clone() for p in tuner.parameters()] + [p.grad for p in blocks.params]
        runs[keep] = (out, grads, len(draws), len(set(draws)))
        for p, t in zip(blocks.params, theta0, strict=True):
            assert torch.equal(p.detach(), t)
            p.grad = None
    (out_d, grads_d, n_d, chunks), (out_k, grads_k, n_k, chunks_k) = runs[False], runs[True]
    assert chunks == chunks_k == n_k > 0  # kept: every chunk drawn exactly once
    assert n_d >= 4 * chunks  # drawn: at least the forwards', shift's, dot's and undo's draws
    assert (out_d.loss_plus, out_d.loss_minus) == (out_k.loss_plus, out_k.loss_minus)
    assert out_d.projected_grad != 0 and torch.equal(out_d.meta_loss, out_k.meta_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads_d, grads_k, strict=True))
    assert any(bool(g.abs().sum() > 0) for g in grads_d[: len(list(tuner.parameters()))])
    assert meta.keeps_z(blocks)  # the default on the CPU
