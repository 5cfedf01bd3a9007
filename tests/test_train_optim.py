"""The optimizer side of textual-inversion training, on small stand-ins (seconds, no SDXL graph):
AdamW against torch.optim.AdamW, the LR schedules against diffusers' get_scheduler, gradient clipping against
torch's clip_grad_norm_, the fp16 dynamic loss scale of the train step (a non-finite step is skipped), and the
trainer's per-encoder learning rates and frozen encoder (`build_train_step`)."""
import os

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from gm.textual_inversion.optim import SCHEDULES, AdamW, learning_rate
from gm.models.loading import load_config
from gm.textual_inversion.train_step import TextualInversionTrainStep
from train_textual_inversion import build_train_step, check_args, parse_args, resolve_defaults

SHAPES = ((2, 32), (2, 64))  # the learned rows of the tiny model's two text encoders
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    clipped = [g.asnumpy() for g in step.update._clip([Tensor(g) for g in grads])]
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
    assert int(optimizer.step.asnumpy()) == 1 and float(step.update.loss_scale.asnumpy()) == 2.0 ** 16
    before = state()

    # a step whose second micro-batch overflows: skipped, counted, scale halved, nothing else touched
    bad = grads()
    bad[1] = Tensor(np.full(SHAPES[1], np.inf, np.float32))
    step(lr, Tensor(False), *grads())
    step(lr, Tensor(True), *bad)
    after = state()
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # rows, moments and Adam's step count: bit-identical
    assert int(step.update.skipped_steps.asnumpy()) == 1
    assert float(step.update.loss_scale.asnumpy()) == 2.0 ** 15
    assert all(not a.asnumpy().any() for a in step.update.accum)  # the overflow does not leak into the next step

    # the next two good steps apply normally; after scale_window (2) good steps the scale doubles again
    g = [grads(), grads()]
    step(lr, Tensor(False), *g[0])
    step(lr, Tensor(True), *g[1])
    expected_m = [0.9 * m + 0.1 * (a.asnumpy() + b.asnumpy()) / 2 for m, a, b in
                  zip(before[2:4], g[0], g[1])]
    for m, expected in zip(optimizer.exp_avg, expected_m):
        np.testing.assert_allclose(m.asnumpy(), expected, rtol=1e-5, atol=1e-12)  # unscaled, averaged
    assert int(optimizer.step.asnumpy()) == 2 and float(step.update.loss_scale.asnumpy()) == 2.0 ** 15
    step(lr, Tensor(False), *grads())
    step(lr, Tensor(True), *grads())
    assert float(step.update.loss_scale.asnumpy()) == 2.0 ** 16 and int(step.update.skipped_steps.asnumpy()) == 1


def trainer_args(save_path, *flags):
    """The trainer's arguments on the tiny config, checked as the script checks them; no weight decay or clipping,
    so an update is AdamW's step alone."""
    args = parse_args(["--config", os.path.join(ROOT, "configs", "training", "sd_xl_tiny_textual_inversion.yaml"),
                       "--data_path", os.path.join(ROOT, "datasets", "synthetic_toy"), "--placeholder_token", "<toy>",
                       "--device_target", "CPU", "--save_path", str(save_path), "--adam_weight_decay", "0",
                       "--max_grad_norm", "0", *flags])
    resolve_defaults(args, load_config(args.config))
    check_args(args)
    return args


@pytest.mark.parametrize("train_encoders, trained", [("l", [True, False]), ("g", [False, True]), ("l,g", [True, True])])
def test_a_frozen_encoders_rows_stay_bit_identical(tmp_path, train_encoders, trained):
    """--train_encoders l or g: after three steps the other encoder's rows are their initial values bit for bit
    (no gradient, no optimizer state), while the trained ones moved."""
    init = random_rows(6)
    rows = [Parameter(Tensor(x), name=f"text{i}.new_embeddings") for i, x in enumerate(init)]
    optimizer, step = build_train_step(RowsLoss(rows), rows, trainer_args(tmp_path, "--train_encoders", train_encoders))
    rng = np.random.RandomState(7)
    for _ in range(3):
        step(Tensor(1e-2, ms.float32), Tensor(True), *[Tensor(rng.normal(0, 1, s).astype(np.float32)) for s in SHAPES])
    for param, start, moves in zip(rows, init, trained):
        assert param.requires_grad is moves
        if moves:
            assert (np.abs(param.asnumpy() - start).max(1) > 0).all()
        else:
            assert np.array_equal(param.asnumpy(), start)
    assert [p.name for p in optimizer.params] == [p.name for p, moves in zip(rows, trained) if moves]
    assert len(step.update.accum) == sum(trained)


def test_per_encoder_learning_rates_scale_each_encoders_update(tmp_path):
    """--learning_rate 1e-3 --learning_rate_clip_l 3e-3 --learning_rate_clip_g 5e-4: AdamW's first step (no weight
    decay) moves each element by lr g / (|g| + eps), so each encoder's update is its rate / 1e-3 times the one
    without per-encoder rates."""
    init, rng = random_rows(8), np.random.RandomState(9)
    grads = [rng.normal(0, 1e-2, s).astype(np.float32) for s in SHAPES]

    def first_update(*flags):
        rows = [Parameter(Tensor(x), name=f"text{i}.new_embeddings") for i, x in enumerate(init)]
        _, step = build_train_step(RowsLoss(rows), rows, trainer_args(tmp_path, "--learning_rate", "1e-3", *flags))
        step(Tensor(1e-3, ms.float32), Tensor(True), *[Tensor(g) for g in grads])  # the scheduled rate: 1e-3
        return [p.asnumpy().astype(np.float64) - x for p, x in zip(rows, init)]

    same = first_update()
    for update, g in zip(same, grads):
        np.testing.assert_allclose(update, -1e-3 * g / (np.abs(g) + 1e-8), rtol=1e-3)
    per_encoder = first_update("--learning_rate_clip_l", "3e-3", "--learning_rate_clip_g", "5e-4")
    np.testing.assert_allclose(per_encoder[0], 3.0 * same[0], rtol=1e-3)
    np.testing.assert_allclose(per_encoder[1], 0.5 * same[1], rtol=1e-3)


@pytest.mark.parametrize("mode", ["free", "preserve"])
def test_embedding_norm_preserve_keeps_each_vectors_norm(tmp_path, mode):
    """--embedding_norm preserve: after every update each learned vector is scaled back to its initial norm (or to
    the norms given, e.g. the vocabulary's mean for random initial vectors); its direction still trains."""
    init, rng = random_rows(10), np.random.RandomState(11)

    def train(row_norms=None):
        rows = [Parameter(Tensor(x), name=f"text{i}.new_embeddings") for i, x in enumerate(init)]
        _, step = build_train_step(RowsLoss(rows), rows, trainer_args(tmp_path, "--embedding_norm", mode),
                                   row_norms=row_norms)
        for _ in range(3):
            step(Tensor(0.1, ms.float32), Tensor(True), *[Tensor(rng.normal(0, 1, s).astype(np.float32))
                                                        for s in SHAPES])
        return [p.asnumpy() for p in rows]

    trained = train()
    for rows, start in zip(trained, init):
        assert (np.abs(rows / np.linalg.norm(rows, axis=1, keepdims=True)
                       - start / np.linalg.norm(start, axis=1, keepdims=True)).max(1) > 1e-3).all()  # turned
        kept = np.allclose(np.linalg.norm(rows, axis=1), np.linalg.norm(start, axis=1), rtol=1e-5)
        assert kept is (mode == "preserve")
    if mode == "preserve":
        given = train([np.full(2, 2.0, np.float32), np.full(2, 3.0, np.float32)])
        np.testing.assert_allclose(np.linalg.norm(given[0], axis=1), 2.0, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(given[1], axis=1), 3.0, rtol=1e-5)


def test_random_initial_vectors_keep_the_vocabularys_mean_norm():
    from types import SimpleNamespace
    from gm.textual_inversion.placeholder import vocabulary_norms

    tables = [np.diag([3.0, 4.0, 5.0]).astype(np.float32), np.full((2, 4), 0.5, np.float32)]  # norms 3,4,5 and 1
    conditioner = SimpleNamespace(text_embedders=lambda: [
        SimpleNamespace(token_embedding=SimpleNamespace(weight=Tensor(t))) for t in tables])
    rows = [np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32)]
    norms = vocabulary_norms(conditioner, rows)
    np.testing.assert_allclose(norms[0], [4.0, 4.0])
    np.testing.assert_allclose(norms[1], [1.0, 1.0])
