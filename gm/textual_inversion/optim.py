"""The optimizer and learning-rate schedules of textual-inversion training.

`AdamW` is PyTorch's (bias-corrected moments, decoupled weight decay), the optimizer diffusers' and kohya's
textual-inversion scripts use, written as a graph-mode cell over the few learned rows; MindSpore's
`nn.AdamWeightDecay` skips the bias correction and its fused AdamW op has no CPU kernel.
"""
import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops


class AdamW(nn.Cell):
    """p <- p - lr * (wd * p + m_hat / (sqrt(v_hat) + eps)); moments kept in fp32 beside each parameter.

    `lr_scales` (one per parameter, default 1) multiply the learning rate given at each step: per-encoder rates
    that follow one schedule."""

    def __init__(self, params, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, lr_scales=None):
        super().__init__()
        self.params = ParameterTuple(params)
        self.lr_scales = tuple(lr_scales) if lr_scales is not None else (1.0,) * len(self.params)
        if len(self.lr_scales) != len(self.params):
            raise ValueError(f"{len(self.lr_scales)} lr_scales for {len(self.params)} parameters")
        self.exp_avg = self.params.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="exp_avg_sq", init="zeros")
        for moment in list(self.exp_avg) + list(self.exp_avg_sq):
            moment.requires_grad = False  # state, not trainable (clone copies the flag)
        self.step = Parameter(ms.Tensor(0, ms.float32), name="adam_step", requires_grad=False)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        # 1 - beta and log(beta) in double precision: in float32, 1 - 0.999 is off by 1.3e-5 (relative)
        self.one_minus_beta1, self.one_minus_beta2 = 1.0 - beta1, 1.0 - beta2
        self.log_beta1, self.log_beta2 = math.log(beta1), math.log(beta2)

    def construct(self, grads, lr):
        step = self.step + 1.0
        ops.assign(self.step, step)
        bias_correction1 = one_minus_power(self.log_beta1, step)
        bias_correction2 = one_minus_power(self.log_beta2, step)
        for i in range(len(self.params)):
            param, m, v, grad = self.params[i], self.exp_avg[i], self.exp_avg_sq[i], grads[i]
            m_new = self.beta1 * m + self.one_minus_beta1 * grad
            v_new = self.beta2 * v + self.one_minus_beta2 * ops.square(grad)
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            update = (m_new / bias_correction1) / (ops.sqrt(v_new / bias_correction2) + self.eps)
            param_lr = lr * self.lr_scales[i]
            ops.assign(param, param * (1.0 - param_lr * self.weight_decay) - param_lr * update)
        return step

    def state_parameters(self):
        """Everything that must be saved to resume exactly."""
        return list(self.exp_avg) + list(self.exp_avg_sq) + [self.step]


def one_minus_power(log_beta, step):
    """1 - beta^step in float32, as -expm1(step * log beta): computing beta^step first would cancel while it is
    close to 1 (1 - 0.999 comes out 1.3e-5 off), and the CPU's expm1 is exp(x) - 1. So |x| <= 1 uses the
    Taylor series x (1 + x/2 (1 + x/3 (...))) to x^12 (error below 1/13!); beyond, exp(x) - 1 is accurate."""
    x = step * log_beta
    series = ops.ones_like(x)
    for k in range(12, 1, -1):
        series = 1.0 + x / k * series
    return ops.select(x > -1.0, -x * series, 1.0 - ops.exp(x))


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def learning_rate(schedule, base_lr, step, total_steps, warmup_steps=0):
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then the schedule's decay
    (the shapes of diffusers' `get_scheduler`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if schedule != "constant" and step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    if schedule in ("constant", "constant_with_warmup"):
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
