"""The validation loss: the diffusion loss of the learned words on fixed held-out draws, the signal that shows
learning (the per-step loss cannot: each step draws one timestep, and the loss depends far more on the timestep
than on the embedding).

The draws are decided once, from the seed alone, so a resumed run (and every rank) has the same ones; the
training state stores them anyway (`state_dict`), and a resume reuses the stored ones. Every image of every word
is drawn equally often; draw j of the M is image j mod P (P images in all), mirrored every other time when
training flips, with the prompt its dataset would give it (template or caption) keyed apart from the training's
draws; its timestep is the j-th of M spread evenly over the schedule (`spread`: stratified, so each image's
draws span the schedule and the mean has no timestep-sampling noise); its posterior and diffusion noise come
from a RandomState keyed by (seed, VALIDATION_KEY, j), drawn as a training step draws its own (`loss_inputs`).
With one image, the draws differ from the training's by noise and timestep only. With bucketing a draw's image
is at its bucket's size, its latent cached at that size, as in training.

`ValidationLoss` evaluates it: the training loss per draw, forward only, in three graphs compiled at their first call
(and, with bucketing, at their first call at each bucket's size). The middle one is the denoiser, nearly all of the
compile; a run that samples validation grids passes the sampling pipeline's, so one compiled UNet serves both.
"""
import collections

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from gm.data.dataset import Choice, prompt_batch
from gm.modules.diffusionmodules.denoiser import BoundDenoiser
from gm.sampling import images_per_call
from gm.textual_inversion.train_step import TextualInversionLoss, loss_inputs

VALIDATION_KEY = 7_411  # seeds the validation's noise apart from the training's (seed, rank, step, micro-batch)
# the dataset keys its prompt choices by (seed, epoch, index): the validation's are epochs no training reaches
VALIDATION_EPOCH = 2 ** 40
Draw = collections.namedtuple("Draw", ["word", "index", "flipped", "prompt", "encoder_prompts", "rand"])


class NoisedDraws(nn.Cell):
    """The training loss (`TextualInversionLoss`) up to the denoiser: its input, its noise levels, its
    conditioning, and the clean latents the loss compares its output with."""

    def __init__(self, loss_net):
        super().__init__(auto_prefix=False)  # the engine's parameters keep their checkpoint names
        self.loss_net = loss_net

    def construct(self, moments, latent_noise, noise, sigma_rand, *cond_inputs):
        context, vector = self.loss_net.conditioner(*cond_inputs)
        latents, noised, sigmas = self.loss_net.noised_latents(moments, latent_noise, noise, sigma_rand)
        return noised, sigmas, context, vector, latents


class DrawLosses(nn.Cell):
    """The training loss after the denoiser: each draw's weighted error [B]."""

    def __init__(self, loss_fn):
        super().__init__(auto_prefix=False)
        self.loss_fn = loss_fn

    def construct(self, denoised, latents, sigmas):
        return self.loss_fn.get_loss(denoised, latents, self.loss_fn.weights(sigmas, latents.ndim))


class ValidationLoss:
    """The loss of each draw [B], without gradient, called as `TextualInversionLoss.per_sample`: the draws' noised
    latents and conditioning, the denoiser, and the weighted errors, each a graph of its own. `denoiser` (a
    `BoundDenoiser`; default: one of this loss's own) may be the sampling pipeline's: the validation then compiles
    no UNet of its own where it evaluates at the batch the pipeline's graph was compiled at."""

    def __init__(self, engine, denoiser=None):
        self.noised_draws = NoisedDraws(TextualInversionLoss(engine))
        self.denoiser = denoiser or BoundDenoiser(engine.denoiser, engine.model)
        self.draw_losses = DrawLosses(engine.loss_fn)

    def __call__(self, moments, latent_noise, noise, sigma_rand, *cond_inputs):
        noised, sigmas, context, vector, latents = self.noised_draws(moments, latent_noise, noise, sigma_rand,
                                                                     *cond_inputs)
        return self.draw_losses(self.denoiser(noised, sigmas, context, vector), latents, sigmas)


def validation_draws(datasets, num_draws, sigma_sampler, flips):
    """The held-out draws (see the module's docstring): `num_draws` rounded up to a multiple of the number of
    images, so that every image counts equally."""
    images = [(word, index) for word, dataset in enumerate(datasets) for index in range(len(dataset))]
    per_image = -(-num_draws // len(images))
    rands = sigma_sampler.spread(per_image * len(images)).asnumpy().tolist()
    draws = []
    for k in range(per_image):
        for p, (word, index) in enumerate(images):
            choice = datasets[word].draw(index, VALIDATION_EPOCH + k)
            draws.append(Draw(word, index, flips and (p + k) % 2 == 1, choice.prompt, choice.encoder_prompts,
                              rands[len(draws)]))
    return draws


class Validation:
    """The validation loss of a run: its draws, their evaluation (`net`), and the best (lowest) loss so far with the
    learned rows that gave it.

    Each rank evaluates its share of the draws (every world_size-th), in batches of one training size (with
    bucketing each image is drawn at its bucket's size; the last batch of a size padded, so the graph compiles once
    per size) and the per-draw losses are summed across ranks: all ranks must call `losses` at the same steps. A
    batch holds `batch_size` draws, by default as many as a sampling call holds images of that size
    (`gm.sampling.images_per_call`), at most the draws of that size.
    """

    def __init__(self, engine, datasets, latents, num_draws, seed, batch_size=None, flips=True, learned_rows=(),
                 rank=0, world_size=1, net=None):
        self.engine, self.latents, self.batch_size = engine, latents, batch_size
        self.rank, self.world_size = rank, world_size
        self.draws = validation_draws(datasets, num_draws, engine.loss_fn.sigma_sampler, flips)
        self.rand_dtype = engine.loss_fn.sigma_sampler.spread(1).dtype
        self.noise_seed = [seed, VALIDATION_KEY]
        # a ValidationLoss, or the per-sample loss the train step has (`BlockwiseLoss`)
        self.net = net or ValidationLoss(engine)
        self.best_step = self.best_loss = None
        # the rows of the best step, saved with the training state (a resume rewrites the best files from them)
        self.best_rows = [Parameter(Tensor(rows.asnumpy().copy()), name=f"best.{rows.name}", requires_grad=False)
                          for rows in learned_rows]

    def state_dict(self):
        """The host part, for the training state (JSON): the draws, their noise seed, the best step and loss."""
        return {"noise_seed": self.noise_seed, "draws": [list(draw) for draw in self.draws],
                "best_step": self.best_step, "best_loss": self.best_loss}

    def load_state_dict(self, state):
        """Take a saved run's draws and best (its best rows are loaded with the training state's parameters)."""
        self.noise_seed = list(state["noise_seed"])
        self.draws = [Draw(word, index, flipped, prompt, tuple(tuple(p) for p in encoder_prompts), rand)
                      for word, index, flipped, prompt, encoder_prompts, rand in state["draws"]]
        self.best_step, self.best_loss = state["best_step"], state["best_loss"]

    def losses(self):
        """The loss of every draw with the learned rows as they are now: float32 [M], the same on every rank."""
        by_size = {}  # training size (height, width): this rank's draws of that size (one size without bucketing)
        for j in range(self.rank, len(self.draws), self.world_size):
            word, index = self.draws[j][:2]
            by_size.setdefault(self.latents[word].dataset.target_sizes[index], []).append(j)
        losses = np.zeros(len(self.draws), np.float32)
        for size, mine in by_size.items():
            batch_size = min(self.batch_size or images_per_call(*size), len(mine))
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                padded = batch + batch[-1:] * (batch_size - len(batch))
                losses[batch] = self.net(*self.inputs(padded)).asnumpy()[:len(batch)]
        if self.world_size > 1:
            from mindspore.mint.distributed import all_reduce

            total = Tensor(losses)
            all_reduce(total)  # sum over ranks: each draw was evaluated by one rank, zeros elsewhere
            losses = total.asnumpy()
        return losses

    def inputs(self, indices):
        """The inputs of `ValidationLoss` for the draws at `indices`: each draw's latent (its image and flip), prompt,
        noise (from its own RandomState, so it does not depend on the batching) and timestep."""
        draws = [self.draws[j] for j in indices]
        entries = [self.latents[d.word].batch([(d.index, d.flipped)]) for d in draws]
        batch = {key: np.concatenate([entry[key] for entry in entries]) for key in entries[0]}
        batch.update(prompt_batch([Choice(None, d.flipped, d.prompt, d.encoder_prompts) for d in draws]))
        moments = batch.pop("moments")
        noises = [loss_inputs(self.engine, moments[i:i + 1], (), np.random.RandomState(self.noise_seed + [j]))[1:3]
                  for i, j in enumerate(indices)]
        latent_noise, noise = (Tensor(np.concatenate([n[k].asnumpy() for n in noises])) for k in range(2))
        rand = Tensor(np.array([d.rand for d in draws]), self.rand_dtype)
        return (Tensor(moments, ms.float32), latent_noise, noise, rand) + tuple(self.engine.conditioner.tokenize(batch))

    def improved(self, step, loss, learned_rows):
        """Whether `loss` at `step` is the lowest so far; if so it becomes the best, with a copy of the rows."""
        if not np.isfinite(loss) or (self.best_loss is not None and loss >= self.best_loss):
            return False
        self.best_step, self.best_loss = step, loss
        for best, rows in zip(self.best_rows, learned_rows):
            best.set_data(Tensor(rows.asnumpy().copy()))  # not in any graph: set_data is safe here
        return True
