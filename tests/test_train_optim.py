"""The optimizer side of textual-inversion training, on small stand-ins (seconds, no SDXL graph):
AdamW against torch.optim.AdamW, the LR schedules against diffusers' get_scheduler, gradient clipping against
torch's clip_grad_norm_, and the fp16 dynamic loss scale of the train step (a non-finite step is skipped)."""
import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from gm.textual_inversion.optim import SCHEDULES, AdamW, learning_rate
from gm.textual_inversion.train_step import TextualInversionTrainStep

SHAPES = ((2, 32), (2, 64))  # the learned rows of the tiny model's two text encoders


def random_rows(seed):
    rng = np.random.RandomState(seed)
    return [rng.normal(0, 0.02, shape).astype(np.float32) for shape in SHAPES]


def test_adamw_matches_torch():
    """Five steps with weight decay, varying gradients and learning rates: same parameters and moments."""
    init = random_rows(0)
    ours = [Parameter(Tensor(x), name=f"rows{i}.new_embeddings") for i, x in enumerate(init)]
    optimizer = AdamW(ours, weight_decay=0.05)
    theirs = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init]
    reference = torch.optim.AdamW(theirs, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)

    rng = np.random.RandomState(1)
    for step, lr in enumerate([1e-2, 5e-3, 5e-3, 2e-3, 1e-3]):
        grads = [rng.normal(0, 10.0 ** -rng.randint(1, 4), shape).astype(np.float32) for shape in SHAPES]
        optimizer(tuple(Tensor(g) for g in grads), Tensor(lr, ms.float32))
        for group in reference.param_groups:
            group["lr"] = lr
        for p, g in zip(theirs, grads):
            p.grad = torch.from_numpy(g)
        reference.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            state = reference.state[q]
            np.testing.assert_allclose(p.asnumpy(), q.detach().numpy(), rtol=1e-6, atol=1e-8,
                                       err_msg=f"rows {i} after step {step + 1}")
            np.testing.assert_allclose(optimizer.exp_avg[i].asnumpy(), state["exp_avg"].numpy(), rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(optimizer.exp_avg_sq[i].asnumpy(), state["exp_avg_sq"].numpy(),
                                       rtol=1e-6, atol=1e-16)
        # the update moved the rows, so agreement is not the trivial "nothing happened"
        assert not np.allclose(ours[0].asnumpy(), init[0])
    assert int(optimizer.step.asnumpy()) == 5


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_schedule_matches_diffusers(schedule):
    base, total, warmup = 5e-4, 40, 7
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    reference = get_scheduler(schedule, dummy, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(reference.get_last_lr()[0])  # the lr optimizer step `step` (0-based) uses
        dummy.step()
        reference.step()
    ours = [learning_rate(schedule, base, step, total, warmup) for step in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)
    assert len(set(np.round(ours, 12))) > (1 if schedule != "constant" else 0)  # the shape is not flat


class RowsLoss(nn.Cell):
    """loss = sum(rows_l * x_l) + sum(rows_g * x_g): each row's gradient is its input, so a test chooses the
    gradients, non-finite ones included, without a model."""

    def __init__(self, rows):
        super().__init__()
        self.rows_l, self.rows_g = rows

    def construct(self, x_l, x_g):
        return ops.sum(self.rows_l * x_l) + ops.sum(self.rows_g * x_g)


def test_clipping_matches_torch():
    grads = [g * 50 for g in random_rows(3)]  # global norm well above 1
    rows = [Parameter(Tensor(x), name=f"text{i}.new_embeddings") for i, x in enumerate(random_rows(2))]
    step = TextualInversionTrainStep(RowsLoss(rows), rows, AdamW(rows), max_grad_norm=1.0)
    clipped = [g.asnumpy() for g in step._clip([Tensor(g) for g in grads])]
    reference = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(reference, grads):
        p.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    for ours, theirs in zip(clipped, reference):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-5)
    assert np.sqrt(sum(np.sum(c ** 2) for c in clipped)) == pytest.approx(1.0, rel=1e-5)


def test_dynamic_loss_scale_skips_non_finite_steps():
    rows = [Parameter(Tensor(x), name=f"text{i}.new_embeddings") for i, x in enumerate(random_rows(4))]
    optimizer = AdamW(rows, weight_decay=1e-2)
    step = TextualInversionTrainStep(RowsLoss(rows), rows, optimizer, accumulation_steps=2, max_grad_norm=0.0,
                                     dynamic_loss_scale=True, init_loss_scale=2.0 ** 16, scale_window=2)
    lr, rng = Tensor(1e-3, ms.float32), np.random.RandomState(5)

    def grads():
        return [Tensor(rng.normal(0, 1e-3, shape).astype(np.float32)) for shape in SHAPES]

    def state():
        return [p.asnumpy().copy() for p in [*rows, *optimizer.state_parameters()]]

    # one good step (two micro-batches): applied, the scale stays
    step(lr, Tensor(False), *grads())
    step(lr, Tensor(True), *grads())
    assert int(optimizer.step.asnumpy()) == 1 and float(step.loss_scale.asnumpy()) == 2.0 ** 16
    before = state()

    # a step whose second micro-batch overflows: skipped, counted, scale halved, nothing else touched
    bad = grads()
    bad[1] = Tensor(np.full(SHAPES[1], np.inf, np.float32))
    step(lr, Tensor(False), *grads())
    step(lr, Tensor(True), *bad)
    after = state()
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # rows, moments and Adam's step count: bit-identical
    assert int(step.skipped_steps.asnumpy()) == 1
    assert float(step.loss_scale.asnumpy()) == 2.0 ** 15
    assert all(not a.asnumpy().any() for a in step.accum)  # the overflow does not leak into the next step

    # the next two good steps apply normally; after scale_window (2) good steps the scale doubles again
    g = [grads(), grads()]
    step(lr, Tensor(False), *g[0])
    step(lr, Tensor(True), *g[1])
    expected_m = [0.9 * m + 0.1 * (a.asnumpy() + b.asnumpy()) / 2 for m, a, b in
                  zip(before[2:4], g[0], g[1])]
    for m, expected in zip(optimizer.exp_avg, expected_m):
        np.testing.assert_allclose(m.asnumpy(), expected, rtol=1e-5, atol=1e-12)  # unscaled, averaged
    assert int(optimizer.step.asnumpy()) == 2 and float(step.loss_scale.asnumpy()) == 2.0 ** 15
    step(lr, Tensor(False), *grads())
    step(lr, Tensor(True), *grads())
    assert float(step.loss_scale.asnumpy()) == 2.0 ** 16 and int(step.skipped_steps.asnumpy()) == 1
