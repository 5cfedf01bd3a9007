"""sgm's diffusion math (schedule, denoiser, loss, guidance, samplers) against diffusers and closed forms.

What is equal to diffusers and what is not:
- the 1000 training sigmas sqrt((1 - a_t) / a_t) are the same table; sgm computes the betas in float64,
  diffusers in float32, so they agree to ~1.3e-5 relative, not bit for bit;
- an n-step schedule takes that table at n timesteps. sgm picks floor(linspace(999, 0, n, endpoint=False)),
  which always starts at t=999 (sigma 14.6146). SDXL's diffusers config ("leading", steps_offset 1) picks
  (n-1-k) * (1000 // n) + 1 instead (e.g. 981, ..., 1 for n=50): a different schedule, not a rounding
  difference. sgm's rule equals diffusers' "trailing" spacing whenever n divides 1000;
- both start from unit noise times sqrt(1 + sigma_max^2) (diffusers: for "leading"; for "trailing" it
  uses sigma_max, so the parity tests scale the start themselves).

The stand-in eps network is tanh-based. MindSpore's CPU tanh kernel is off by up to 1e-4, so the
MindSpore side computes tanh(z) as 2 sigmoid(2z) - 1 (accurate to 1e-6).
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from reference import SCHEDULER as SDXL_SCHEDULER  # diffusers' SDXL base scheduler config

from gm.modules.diffusionmodules import sampling
from gm.modules.diffusionmodules.denoiser import BoundDenoiser, Denoiser, DiscreteDenoiser
from gm.modules.diffusionmodules.denoiser_scaling import EDMScaling, EpsScaling, VScaling, VScalingWithEDMcNoise
from gm.modules.diffusionmodules.denoiser_weighting import EDMWeighting, EpsWeighting, UnitWeighting, VWeighting
from gm.modules.diffusionmodules.discretizer import Img2ImgDiscretizationWrapper, LegacyDDPMDiscretization
from gm.modules.diffusionmodules.guiders import VanillaCFG
from gm.modules.diffusionmodules.loss import StandardDiffusionLoss
from gm.modules.diffusionmodules.sampling_utils import img2img_noised_input, linear_multistep_coeff, randn_like_fn
from gm.modules.diffusionmodules.sigma_sampling import DiscreteSampling, EDMSampling
from gm.models.loading import load_config
from gm.textual_inversion.train_step import loss_inputs
from gm.util import instantiate_from_config
from train_textual_inversion import UsageError, parse_args, set_loss_options

PKG = "gm.modules.diffusionmodules."
LEGACY = {"target": PKG + "discretizer.LegacyDDPMDiscretization",
          "params": {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps": 1000}}
EDM = {"target": PKG + "discretizer.EDMDiscretization"}
EPS_SCALING = {"target": PKG + "denoiser_scaling.EpsScaling"}
SIGMA_RTOL = 2e-5  # float32 (diffusers) vs float64 (sgm) betas


def diffusers_train_sigmas():
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return (((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).numpy()


def sigma_column(sigma, ndim=4):
    return np.asarray(sigma, np.float64).reshape((-1,) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------- schedules

def test_training_sigmas_match_formula_and_diffusers():
    disc = LegacyDDPMDiscretization()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    np.testing.assert_allclose(disc.train_sigmas, np.sqrt((1 - alphas_cumprod) / alphas_cumprod), rtol=1e-7)
    np.testing.assert_allclose(disc.train_sigmas, diffusers_train_sigmas(), rtol=SIGMA_RTOL)
    # the denoiser's table: ascending, index = timestep; the full schedule: descending, then 0
    np.testing.assert_array_equal(disc(1000, do_append_zero=False, flip=True), disc.train_sigmas)
    np.testing.assert_allclose(disc(1000), EulerDiscreteScheduler(**SDXL_SCHEDULER).sigmas.numpy(), rtol=SIGMA_RTOL)
    assert disc.train_sigmas[-1] == pytest.approx(14.6146, abs=1e-4) and disc.train_sigmas[0] == pytest.approx(0.0292, abs=1e-4)


def test_n_step_schedule_follows_sgm_rule():
    disc = LegacyDDPMDiscretization()
    np.testing.assert_array_equal(disc.timesteps(5), [199, 399, 599, 799, 999])
    for n in (1, 5, 30, 50, 999):
        sigmas = disc(n)
        assert sigmas.dtype == np.float32 and len(sigmas) == n + 1 and sigmas[-1] == 0
        np.testing.assert_array_equal(sigmas[:-1], disc.train_sigmas[disc.timesteps(n)[::-1]])
        assert sigmas[0] == disc.train_sigmas[999] and np.all(np.diff(sigmas) < 0)
    with pytest.raises(ValueError):
        disc(1001)


@pytest.mark.parametrize("n", [5, 30, 50])
def test_n_step_schedule_vs_diffusers_sdxl_leading(n):
    """Same sigma table, different timesteps: diffusers' "leading" schedule is our table at its timesteps."""
    disc = LegacyDDPMDiscretization()
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    scheduler.set_timesteps(n)
    timesteps = scheduler.timesteps.numpy().astype(int)
    np.testing.assert_array_equal(timesteps, np.arange(n)[::-1] * (1000 // n) + 1)
    np.testing.assert_allclose(scheduler.sigmas.numpy()[:-1], disc.train_sigmas[timesteps], rtol=SIGMA_RTOL)
    # the known difference: sgm starts at t=999, diffusers' leading spacing below it, so at a lower sigma
    assert disc.timesteps(n)[-1] == 999 and timesteps[0] < 999 and scheduler.sigmas[0].item() < disc(n)[0]
    assert scheduler.init_noise_sigma.item() == pytest.approx((scheduler.sigmas[0].item() ** 2 + 1) ** 0.5)


def test_n_step_schedule_equals_diffusers_trailing_when_n_divides_1000():
    disc = LegacyDDPMDiscretization()
    scheduler = EulerDiscreteScheduler(**dict(SDXL_SCHEDULER, timestep_spacing="trailing"))
    for n in (10, 25, 50, 100):
        scheduler.set_timesteps(n)
        np.testing.assert_array_equal(scheduler.timesteps.numpy().astype(int), disc.timesteps(n)[::-1])
        np.testing.assert_allclose(scheduler.sigmas.numpy(), disc(n), rtol=SIGMA_RTOL)
    scheduler.set_timesteps(30)  # 1000 / 30 is not an integer: rounding differs (966 vs 965)
    assert scheduler.timesteps[1].item() == 966 and disc.timesteps(30)[-2] == 965


def test_img2img_wrapper_keeps_the_last_strength_fraction():
    disc = LegacyDDPMDiscretization()
    full = disc(10)  # 11 sigmas
    np.testing.assert_array_equal(Img2ImgDiscretizationWrapper(disc, 1.0)(10), full)
    np.testing.assert_array_equal(Img2ImgDiscretizationWrapper(disc, 0.5)(10), full[-5:])  # int(0.5 * 11) = 5
    np.testing.assert_array_equal(Img2ImgDiscretizationWrapper(disc, 0.0)(10), [0.0])
    with pytest.raises(ValueError):
        Img2ImgDiscretizationWrapper(disc, 1.5)


# ----------------------------------------------------------------------------------- denoiser

SIGMAS = np.array([0.03, 0.5, 1.0, 3.7, 14.6], np.float32)


def scalings(scaling, sigmas=SIGMAS):
    return [c.asnumpy().astype(np.float64) for c in scaling(Tensor(sigma_column(sigmas), ms.float32))]


def test_scalings_equal_their_formulas():
    s = sigma_column(SIGMAS)
    expected = {
        EpsScaling(): (np.ones_like(s), -s, 1 / np.sqrt(s**2 + 1), s),
        VScaling(): (1 / (s**2 + 1), -s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1), s),
        VScalingWithEDMcNoise(): (1 / (s**2 + 1), -s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1), 0.25 * np.log(s)),
        EDMScaling(0.5): (0.25 / (s**2 + 0.25), 0.5 * s / np.sqrt(s**2 + 0.25), 1 / np.sqrt(s**2 + 0.25), 0.25 * np.log(s)),
    }
    for scaling, formulas in expected.items():
        for got, want in zip(scalings(scaling), formulas):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=type(scaling).__name__)


def test_weightings_equal_their_formulas_and_undo_c_out():
    s = sigma_column(SIGMAS)
    for weighting, formula, scaling in [
        (EpsWeighting(), s**-2.0, EpsScaling()),
        (VWeighting(), (s**2 + 1) / s**2, VScaling()),
        (EDMWeighting(0.5), (s**2 + 0.25) / (0.5 * s) ** 2, EDMScaling(0.5)),
        (UnitWeighting(), np.ones_like(s), None),
    ]:
        w = weighting(Tensor(s, ms.float32)).asnumpy()
        np.testing.assert_allclose(w, formula, rtol=1e-5)
        if scaling is not None:  # lambda = 1 / c_out^2: unit weight on the network's own target
            np.testing.assert_allclose(w * scalings(scaling)[1] ** 2, 1.0, rtol=1e-5)


class LinearNet(nn.Cell):
    """F(x, t) = 0.5 x + 0.1: depends on the scaled input, ignores the noise level."""

    def construct(self, x, t, context, y):
        return 0.5 * x + 0.1


@pytest.mark.parametrize("scaling,prediction_type", [(EpsScaling, "epsilon"), (VScaling, "v_prediction")])
def test_denoiser_matches_diffusers_scale_model_input_and_x0(scaling, prediction_type):
    """c_in x = diffusers' scale_model_input, and D(x, sigma) = the x0 that diffusers' Euler step predicts."""
    target = PKG + "denoiser_scaling." + scaling.__name__
    denoiser = BoundDenoiser(Denoiser({"target": target}), LinearNet())
    scale = scaling()
    scheduler = EulerDiscreteScheduler(**dict(SDXL_SCHEDULER, prediction_type=prediction_type))
    scheduler.set_timesteps(sigmas=list(LegacyDDPMDiscretization()(8)))
    x = np.random.RandomState(0).standard_normal((2, 4, 8, 8)).astype(np.float32) * 5
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].item()
        model_input = scheduler.scale_model_input(torch.from_numpy(x), t)
        c_in = scalings(scale, [sigma])[2]
        np.testing.assert_allclose(c_in * x, model_input.numpy(), rtol=1e-6, atol=1e-6)
        x0 = scheduler.step(0.5 * model_input + 0.1, t, torch.from_numpy(x)).pred_original_sample.numpy()
        sigma_b = Tensor(np.full((2,), sigma, np.float32))
        np.testing.assert_allclose(denoiser(Tensor(x), sigma_b, None, None).asnumpy(), x0, atol=1e-5)


class TimestepNet(nn.Cell):
    """Returns the timestep it is given, so tests can see c_noise."""

    def construct(self, x, t, context, y):
        return ops.zeros_like(x) + t.astype(x.dtype).reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def discrete_denoiser():
    return DiscreteDenoiser(EPS_SCALING, 1000, LEGACY)


def test_discrete_denoiser_quantizes_sigma_and_feeds_the_timestep(discrete_denoiser):
    den = discrete_denoiser
    assert not list(den.parameters_and_names())  # sigmas is a constant, not a checkpoint key
    table = LegacyDDPMDiscretization().train_sigmas
    np.testing.assert_array_equal(den.sigmas.asnumpy(), table)
    idx = np.array([0, 1, 500, 998, 999], np.int32)
    np.testing.assert_array_equal(den.sigma_to_idx(Tensor(table[idx])).asnumpy(), idx)
    np.testing.assert_array_equal(den.idx_to_sigma(Tensor(idx)).asnumpy(), table[idx])
    off_grid = (table[idx] * np.array([1.0, 1.001, 0.9999, 1.0001, 5.0])).astype(np.float32)
    np.testing.assert_array_equal(den.sigma_to_idx(Tensor(off_grid)).asnumpy(), idx)
    # D = x - sigma_q * F(c_in x, t): the network sees the timestep, the formula the snapped sigma
    x = np.full((5, 1, 2, 2), 3.0, np.float32)
    out = den(TimestepNet(), Tensor(x), Tensor(off_grid), None, None).asnumpy()
    np.testing.assert_allclose(out, x - sigma_column(table[idx]) * sigma_column(idx), rtol=1e-6)


# ----------------------------------------------------------------------------------- training loss

class TanhNet(nn.Cell):
    """eps = tanh(a x + b t + mean(context) + mean(y)), tanh written as 2 sigmoid(2z) - 1 (see module doc)."""

    def __init__(self):
        super().__init__()
        self.a = Parameter(Tensor(0.7, ms.float32), name="a")

    def construct(self, x, t, context, y):
        z = self.a * x + 0.002 * t.astype(x.dtype).reshape(-1, 1, 1, 1)
        z = z + context.mean((1, 2)).reshape(-1, 1, 1, 1) + y.mean(1).reshape(-1, 1, 1, 1)
        return 2 * ops.sigmoid(2 * z) - 1


def torch_tanh_net(a, x, t, context, y):
    z = a * x + 0.002 * t.float().reshape(-1, 1, 1, 1)
    return torch.tanh(z + context.mean((1, 2)).reshape(-1, 1, 1, 1) + y.mean(1).reshape(-1, 1, 1, 1))


def test_loss_equals_diffusers_eps_mse_and_its_gradient(discrete_denoiser):
    loss_fn = StandardDiffusionLoss(
        {"target": PKG + "sigma_sampling.DiscreteSampling", "params": {"discretization_config": LEGACY, "num_idx": 1000}},
        {"target": PKG + "denoiser_weighting.EpsWeighting"},
    )
    rng = np.random.RandomState(0)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((3, 5, 6)).astype(np.float32) * 0.3
    y = rng.standard_normal((3, 7)).astype(np.float32) * 0.3
    noise, idx = loss_fn.draw_inputs(x.shape, np.random.RandomState(1))
    noise2, idx2 = loss_fn.draw_inputs(x.shape, np.random.RandomState(1))
    np.testing.assert_array_equal(noise.asnumpy(), noise2.asnumpy())
    np.testing.assert_array_equal(idx.asnumpy(), idx2.asnumpy())
    idx = Tensor(np.array([3, 420, 999], np.int32))  # spread over the schedule

    net = TanhNet()

    def mean_loss(x, context, y, noise, idx):
        return loss_fn(net, discrete_denoiser, x, context, y, noise, idx).mean()

    inputs = (Tensor(x), Tensor(context), Tensor(y), noise, idx)
    ours = loss_fn(net, discrete_denoiser, *inputs).asnumpy()
    grad = ms.grad(mean_loss, grad_position=None, weights=[net.a])(*inputs)[0].asnumpy()

    # diffusers' textual-inversion loss: noisy = sqrt(a_t) x + sqrt(1 - a_t) n, loss = |eps(noisy, t) - n|^2
    scheduler = DDPMScheduler(**{k: v for k, v in SDXL_SCHEDULER.items() if k != "timestep_spacing"})
    t = torch.from_numpy(idx.asnumpy().astype(np.int64))
    a = torch.tensor(0.7, requires_grad=True)
    noise_t = torch.from_numpy(noise.asnumpy())
    noisy = scheduler.add_noise(torch.from_numpy(x), noise_t, t)
    eps = torch_tanh_net(a, noisy, t, torch.from_numpy(context), torch.from_numpy(y))
    ref = ((eps - noise_t) ** 2).mean((1, 2, 3))
    ref.mean().backward()
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-4)
    np.testing.assert_allclose(grad, a.grad.numpy(), rtol=1e-3)


def test_sigma_samplers_and_offset_noise():
    sampler = DiscreteSampling(LEGACY, 1000)
    idx = sampler.draw(64, np.random.RandomState(0))
    np.testing.assert_array_equal(idx.asnumpy(), np.random.RandomState(0).randint(0, 1000, (64,)))
    np.testing.assert_array_equal(sampler(idx).asnumpy(), LegacyDDPMDiscretization().train_sigmas[idx.asnumpy()])
    edm = EDMSampling(p_mean=-1.2, p_std=1.2)
    rand = edm.draw(16, np.random.RandomState(0))
    np.testing.assert_allclose(edm(rand).asnumpy(), np.exp(-1.2 + 1.2 * rand.asnumpy()), rtol=1e-5)
    # spread (the validation loss's levels): the midpoints of equal-probability strata
    np.testing.assert_array_equal(sampler.spread(4).asnumpy(), [125, 375, 625, 875])
    spread = edm.spread(5).asnumpy()
    np.testing.assert_allclose(spread, [-1.2816, -0.5244, 0, 0.5244, 1.2816], atol=1e-4)  # N(0, 1) at 0.1, 0.3, ...
    # offset noise: an extra per-sample, per-channel constant on top of the same base draw
    plain = StandardDiffusionLoss({"target": PKG + "sigma_sampling.EDMSampling"}, {"target": PKG + "denoiser_weighting.UnitWeighting"})
    offset = StandardDiffusionLoss({"target": PKG + "sigma_sampling.EDMSampling"}, {"target": PKG + "denoiser_weighting.UnitWeighting"},
                                   offset_noise_level=0.1)
    diff = offset.draw_inputs((2, 3, 4, 4), np.random.RandomState(5))[0].asnumpy() - \
        plain.draw_inputs((2, 3, 4, 4), np.random.RandomState(5))[0].asnumpy()
    assert np.abs(diff).max() > 1e-3
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :, :1, :1], diff.shape), atol=1e-6)


DISCRETE_SAMPLING = {"target": PKG + "sigma_sampling.DiscreteSampling",
                     "params": {"discretization_config": LEGACY, "num_idx": 1000}}
TINY_TI_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "training",
                              "sd_xl_tiny_textual_inversion.yaml")


def test_min_snr_gamma_weighting_by_hand(discrete_denoiser):
    """--snr_gamma 5: per sample, the eps-MSE times min(SNR, 5) / SNR, SNR = alpha_bar / (1 - alpha_bar) from the
    DDPM betas, computed here in numpy; the timesteps put SNR on both sides of gamma."""
    loss_fn = StandardDiffusionLoss(DISCRETE_SAMPLING, {"target": PKG + "denoiser_weighting.EpsMinSNRWeighting",
                                                        "params": {"gamma": 5.0}})
    rng = np.random.RandomState(0)
    x = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    idx = np.array([10, 100, 400, 999], np.int32)
    ours = loss_fn(StandInEpsNet(), discrete_denoiser, Tensor(x), COND["crossattn"], COND["vector"], Tensor(noise),
                   Tensor(idx)).asnumpy()

    alpha_bar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[idx]
    snr = alpha_bar / (1 - alpha_bar)
    assert (snr > 5).sum() == 2 and (snr < 5).sum() == 2
    a = alpha_bar.reshape(-1, 1, 1, 1)
    x_in = np.sqrt(a) * x + np.sqrt(1 - a) * noise  # what the UNet sees: DDPM's noised latents
    eps = 0.9 * x_in + 0.3 * np.tanh(0.7 * x_in + 0.002 * idx.reshape(-1, 1, 1, 1))
    expected = ((eps - noise) ** 2).mean((1, 2, 3)) * np.minimum(snr, 5.0) / snr
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_noise_offset_by_hand():
    """--noise_offset 0.1: `loss_inputs` draws from its one RandomState the posterior noise, then the diffusion
    noise plus 0.1 x an N(0, 1) of shape [B, C, 1, 1] (kohya's offset noise), then the timesteps."""
    loss_fn = StandardDiffusionLoss(DISCRETE_SAMPLING, {"target": PKG + "denoiser_weighting.EpsWeighting"},
                                    offset_noise_level=0.1)
    moments = np.random.RandomState(0).standard_normal((2, 8, 3, 3)).astype(np.float32)  # [B, 2C, h, w]
    _, latent_noise, noise, idx = loss_inputs(SimpleNamespace(loss_fn=loss_fn), moments, (), np.random.RandomState(7))

    rng = np.random.RandomState(7)
    expected_latent_noise = rng.standard_normal((2, 4, 3, 3))
    base = rng.standard_normal((2, 4, 3, 3))
    offset = rng.standard_normal((2, 4)).reshape(2, 4, 1, 1)
    np.testing.assert_array_equal(latent_noise.asnumpy(), expected_latent_noise.astype(np.float32))
    np.testing.assert_array_equal(noise.asnumpy(), (base + 0.1 * offset).astype(np.float32))
    np.testing.assert_array_equal(idx.asnumpy(), rng.randint(0, 1000, (2,)))


def test_loss_options_off_leave_the_loss_bit_identical(discrete_denoiser):
    """The trainer's defaults (no --snr_gamma, --noise_offset 0) leave the config's loss as it was: the same
    draws and losses, bit for bit; each option on changes them; --snr_gamma needs the eps objective."""
    config = load_config(TINY_TI_CONFIG).model.params.loss_fn_config
    args = parse_args(["--data_path", "data", "--placeholder_token", "<toy>"])
    rng = np.random.RandomState(0)
    x = Tensor(rng.standard_normal((3, 4, 2, 2)).astype(np.float32))

    def loss_and_draws(loss_fn):
        noise, idx = loss_fn.draw_inputs(x.shape, np.random.RandomState(3))
        loss = loss_fn(StandInEpsNet(), discrete_denoiser, x, COND["crossattn"], COND["vector"], noise, idx)
        return loss.asnumpy(), noise.asnumpy(), idx.asnumpy()

    def configured(snr_gamma, noise_offset):
        loss_fn = instantiate_from_config(config)
        set_loss_options(loss_fn, snr_gamma, noise_offset)
        return loss_and_draws(loss_fn)

    expected = loss_and_draws(instantiate_from_config(config))
    for ours, theirs in zip(configured(args.snr_gamma, args.noise_offset), expected):
        np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(configured(1.0, 0.0)[0], expected[0])
    assert not np.array_equal(configured(None, 0.1)[1], expected[1])
    v_loss = StandardDiffusionLoss(DISCRETE_SAMPLING, {"target": PKG + "denoiser_weighting.VWeighting"})
    with pytest.raises(UsageError, match="--snr_gamma weights the eps objective, .* VWeighting"):
        set_loss_options(v_loss, 5.0, 0.0)


# ----------------------------------------------------------------------------------- samplers vs diffusers

def stand_in_eps_torch(x_in, t):
    return 0.9 * x_in + 0.3 * torch.tanh(0.7 * x_in + 0.002 * t)


class StandInEpsNet(nn.Cell):
    """0.9 x + 0.3 tanh(0.7 x + 0.002 t): roughly denoises, and depends on the timestep."""

    def construct(self, x, t, context, y):
        z = 0.7 * x + 0.002 * t.astype(x.dtype).reshape(-1, 1, 1, 1)
        return 0.9 * x + 0.3 * (2 * ops.sigmoid(2 * z) - 1)


@pytest.fixture(scope="module")
def stand_in_denoiser(discrete_denoiser):
    return BoundDenoiser(discrete_denoiser, StandInEpsNet()).denoise  # as the UNet will plug in


COND = {"crossattn": Tensor(np.zeros((2, 3, 8), np.float32)), "vector": Tensor(np.zeros((2, 5), np.float32))}
N_STEPS = 25  # divides 1000: diffusers' "trailing" timesteps equal sgm's


def diffusers_loop(scheduler, x_unit, generator=None):
    latents = torch.from_numpy(x_unit) * (1 + scheduler.sigmas[0].item() ** 2) ** 0.5
    for t in scheduler.timesteps:
        eps = stand_in_eps_torch(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    return latents.numpy()


def test_euler_matches_diffusers(stand_in_denoiser):
    x = np.random.RandomState(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    sampler = sampling.EulerEDMSampler(LEGACY, num_steps=N_STEPS)
    ours = sampler(stand_in_denoiser, Tensor(x), COND).asnumpy()
    # SDXL's scheduler config, given our schedule: it recovers our timesteps from the sigmas
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    scheduler.set_timesteps(sigmas=list(sampler.discretization(N_STEPS)))
    np.testing.assert_allclose(scheduler.timesteps.numpy(), LegacyDDPMDiscretization().timesteps(N_STEPS)[::-1], atol=1e-2)
    assert np.abs(ours).max() > 0.5
    np.testing.assert_allclose(ours, diffusers_loop(scheduler, x), atol=1e-4, rtol=0)


def test_euler_ancestral_matches_diffusers(stand_in_denoiser):
    x = np.random.RandomState(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    generator = torch.Generator().manual_seed(3)

    def noise_fn(x):  # the draws diffusers makes, in the same order
        return Tensor(torch.randn(x.shape, generator=generator).numpy())

    ours = sampling.EulerAncestralSampler(LEGACY, num_steps=N_STEPS)(stand_in_denoiser, Tensor(x), COND, noise_fn=noise_fn)
    scheduler = EulerAncestralDiscreteScheduler(**dict(SDXL_SCHEDULER, timestep_spacing="trailing"))
    scheduler.set_timesteps(N_STEPS)  # its own float32 sigma table at our timesteps
    np.testing.assert_allclose(scheduler.sigmas.numpy(), LegacyDDPMDiscretization()(N_STEPS), rtol=SIGMA_RTOL)
    ref = diffusers_loop(scheduler, x, torch.Generator().manual_seed(3))
    np.testing.assert_allclose(ours.asnumpy(), ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- samplers on a Gaussian toy

MU, S = 0.5, 0.5  # data ~ N(MU, S^2) per element


def gaussian_denoiser(x, sigma, cond):
    """The exact D(x, sigma) = E[x0 | x] of N(mu, S^2) data, mu per sample from cond (or MU)."""
    mu = sigma_column(cond["crossattn"].asnumpy()) if cond else MU
    s2 = S**2 / (S**2 + sigma_column(sigma.asnumpy()) ** 2)
    return Tensor((mu + s2 * (x.asnumpy() - mu)).astype(np.float32))


def ode_solution(x_sigma, sigma, mu=MU):
    """The probability-flow ODE from noise level sigma to 0, exactly: x0 = mu + S / sqrt(S^2 + sigma^2) (x - mu)."""
    return mu + S / np.sqrt(S**2 + sigma**2) * (x_sigma - mu)


def unit_noise(shape=(2, 4, 32, 32), seed=0):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name,order,max_err", [
    ("EulerEDMSampler", 1, 0.2), ("HeunEDMSampler", 2, 0.03), ("DPMPP2MSampler", 2, 0.03), ("LinearMultistepSampler", 3, 0.012),
])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name, order, max_err):
    x = unit_noise()
    errors = []
    for n in (20, 40):
        sampler = getattr(sampling, name)(EDM, num_steps=n)
        sigma_max = float(sampler.discretization(n)[0])
        out = sampler(gaussian_denoiser, Tensor(x), {}).asnumpy()
        errors.append(np.abs(out - ode_solution(x * np.sqrt(1 + sigma_max**2), sigma_max)).max())
    assert errors[1] < max_err, errors
    assert errors[0] / errors[1] > 0.9 * 2**order, errors  # halving the step cuts the error by 2^order


@pytest.mark.parametrize("name,params", [
    ("EulerEDMSampler", {"s_churn": 10.0}), ("EulerAncestralSampler", {}), ("DPMPP2SAncestralSampler", {}),
])
def test_stochastic_samplers_sample_the_data_distribution(name, params):
    sampler = getattr(sampling, name)(EDM, num_steps=200, **params)
    out = sampler(gaussian_denoiser, Tensor(unit_noise()), {}, noise_fn=randn_like_fn(1)).asnumpy()
    assert abs(out.mean() - MU) < 0.02 and abs(out.std() - S) < 0.025, (out.mean(), out.std())
    again = sampler(gaussian_denoiser, Tensor(unit_noise()), {}, noise_fn=randn_like_fn(1)).asnumpy()
    np.testing.assert_array_equal(out, again)  # a seeded noise source reproduces the sample


def test_cfg_guides_toward_the_extrapolated_condition():
    """With exact denoisers of N(mu_c, S^2) and N(mu_u, S^2), CFG's D_u + w (D_c - D_u) is the exact
    denoiser of N(mu_u + w (mu_c - mu_u), S^2): the sampler must land on that ODE solution."""
    mu_c, mu_u, scale = 0.8, 0.2, 3.0
    guider = {"target": PKG + "guiders.VanillaCFG", "params": {"scale": scale}}
    sampler = sampling.HeunEDMSampler(EDM, num_steps=40, guider_config=guider)
    x = unit_noise((2, 1, 16, 16))
    cond = {"crossattn": Tensor(np.full((2, 1), mu_c, np.float32)), "txt": "kept as is"}
    uc = {"crossattn": Tensor(np.full((2, 1), mu_u, np.float32)), "txt": "kept as is"}
    out = sampler(gaussian_denoiser, Tensor(x), cond, uc).asnumpy()
    sigma_max = float(sampler.discretization(40)[0])
    mu = mu_u + scale * (mu_c - mu_u)
    np.testing.assert_allclose(out, ode_solution(x * np.sqrt(1 + sigma_max**2), sigma_max, mu), atol=0.03)

    x_in, s_in, c_in = VanillaCFG(scale).prepare_inputs(Tensor(x), Tensor(np.ones(2, np.float32)), cond, uc)
    assert x_in.shape == (4, 1, 16, 16) and s_in.shape == (4,) and c_in["txt"] == "kept as is"
    np.testing.assert_array_equal(c_in["crossattn"].asnumpy()[:, 0], np.float32([mu_u, mu_u, mu_c, mu_c]))  # [uncond, cond]


def test_img2img_starts_at_the_pruned_sigma_and_keeps_the_data_distribution():
    n, strength = 40, 0.6
    sampler = sampling.HeunEDMSampler(EDM, num_steps=n)
    sampler.discretization = Img2ImgDiscretizationWrapper(sampler.discretization, strength)
    sigmas = sampler.discretization(n)
    assert len(sigmas) == int(strength * (n + 1))
    z = MU + S * unit_noise(seed=1)  # "encoded images" from the data distribution
    noise = unit_noise(seed=2)
    x_in = img2img_noised_input(Tensor(z), Tensor(noise), float(sigmas[0]))
    out = sampler(gaussian_denoiser, x_in, {}).asnumpy()
    np.testing.assert_allclose(out, ode_solution(z + noise * sigmas[0], float(sigmas[0])), atol=0.04)
    assert abs(out.mean() - MU) < 0.02 and abs(out.std() - S) < 0.02


def test_on_step_callback_and_progress_bar():
    infos = []
    sampler = sampling.DPMPP2MSampler(LEGACY, num_steps=6, verbose=True)
    out = sampler(gaussian_denoiser, Tensor(unit_noise((1, 1, 4, 4))), {}, on_step=infos.append)
    assert [info["i"] for info in infos] == list(range(6)) and infos[-1]["num_steps"] == 6
    np.testing.assert_array_equal(infos[-1]["x"].asnumpy(), out.asnumpy())
    assert infos[0]["sigma"] == pytest.approx(14.6146, abs=1e-4)


def test_linear_multistep_coeffs_integrate_the_lagrange_basis():
    t = LegacyDDPMDiscretization()(10).astype(np.float64)
    for i in range(3, 9):
        coeffs = [linear_multistep_coeff(4, t, i, j) for j in range(4)]
        assert sum(coeffs) == pytest.approx(t[i + 1] - t[i])  # the basis sums to 1
        # exact for cubics: integrating f(tau) = tau^3 from its values at the nodes
        assert sum(c * t[i - j] ** 3 for j, c in enumerate(coeffs)) == pytest.approx((t[i + 1] ** 4 - t[i] ** 4) / 4)
