"""One textual-inversion training step: the loss, its gradients with respect to the learned rows only, and the
update.

`TextualInversionLoss` is the loss as a function of the learned rows: cached VAE latents are sampled from
their posterior, noised at a random level, and denoised by the frozen UNet under the conditioning of a prompt
that holds the placeholder, through both frozen text encoders. `GradientUpdate` accumulates micro-batches, then
unscales (fp16 loss scale), averages across data-parallel ranks, skips the update if a gradient is not finite,
clips and applies AdamW. `TextualInversionTrainStep` is both in one graph (the default, and Ascend's);
`BlockwiseTrainStep` the same numbers with the UNet run layer by layer from the host (`--blockwise_unet`: the
full-size model on the CPU). `loss_inputs` draws a micro-batch's noise on the host, for the trainer, the benchmark
and the pretraining tool alike.
"""
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from gm.models.autoencoder import posterior_sample
from gm.modules.diffusionmodules.blockwise import BlockwiseUNet
from gm.util import release_free_memory


def loss_inputs(engine, moments, cond_inputs, rng, latent_rng=None):
    """The inputs of `TextualInversionLoss` for posterior `moments` (numpy [B, 2C, h, w]) and `cond_inputs`
    (`conditioner.tokenize(batch)`): posterior noise from `latent_rng` (default `rng`), then diffusion noise and
    noise levels from `rng` (a numpy RandomState, as the sigma sampler draws)."""
    latent_shape = (moments.shape[0], moments.shape[1] // 2) + moments.shape[2:]
    latent_noise = Tensor((rng if latent_rng is None else latent_rng).standard_normal(latent_shape), ms.float32)
    noise, sigma_rand = engine.loss_fn.draw_inputs(latent_shape, rng)
    return (Tensor(moments, ms.float32), latent_noise, noise, sigma_rand) + tuple(cond_inputs)


class TextualInversionLoss(nn.Cell):
    """Mean diffusion loss of a micro-batch (sgm's StandardDiffusionLoss on latents x scale_factor)."""

    def __init__(self, engine):
        super().__init__(auto_prefix=False)  # the engine's parameters keep their checkpoint names
        self.conditioner = engine.conditioner
        self.model = engine.model
        self.denoiser = engine.denoiser
        self.loss_fn = engine.loss_fn
        self.scale_factor = engine.scale_factor

    def construct(self, moments, latent_noise, noise, sigma_rand, *cond_inputs):
        """moments [B, 2C, h, w]: cached VAE posterior (mean, log-variance); latent_noise, noise: N(0, I) draws
        shaped [B, C, h, w]; sigma_rand: the sigma sampler's draw; cond_inputs: `conditioner.tokenize(batch)`."""
        return self.per_sample(moments, latent_noise, noise, sigma_rand, *cond_inputs).mean()

    def per_sample(self, moments, latent_noise, noise, sigma_rand, *cond_inputs):
        """Each sample's loss [B] (the validation loss keeps its draws apart)."""
        context, vector = self.conditioner(*cond_inputs)
        return self.per_sample_given_conditioning(moments, latent_noise, noise, sigma_rand, context, vector)

    def clean_latents(self, moments, latent_noise):
        """The latents the loss denoises: a draw from the cached posterior, x scale_factor."""
        return posterior_sample(moments, latent_noise) * self.scale_factor

    def noised_latents(self, moments, latent_noise, noise, sigma_rand):
        """(the clean latents, the noised latents the denoiser takes, their noise levels): the loss up to the
        denoiser, for the graphs that run it apart (`UNetInputs`, the validation's `NoisedDraws`)."""
        latents = self.clean_latents(moments, latent_noise)
        noised, sigmas = self.loss_fn.noised(latents, noise, sigma_rand)
        return latents, noised, sigmas

    def per_sample_given_conditioning(self, moments, latent_noise, noise, sigma_rand, context, vector):
        """Each sample's loss once the conditioner has run: `context` [B, L, D] (crossattn), `vector` [B, V]."""
        latents = self.clean_latents(moments, latent_noise)
        return self.loss_fn(self.model, self.denoiser, latents, context, vector, noise, sigma_rand)


class ScaledLoss(nn.Cell):
    """loss x loss_scale, so fp16 gradients do not underflow; the scale is undone before the update."""

    def __init__(self, loss_net, loss_scale):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.loss_scale = loss_scale

    def construct(self, *inputs):
        return self.loss_net(*inputs) * self.loss_scale


class GradientUpdate(nn.Cell):
    """What follows the gradients of one micro-batch: accumulate them, and on the last of `accumulation_steps`
    (`apply_update` True) unscale them (fp16 loss scale), average them across data-parallel ranks, skip the update
    if one is not finite, clip them and apply the optimizer.

    Gradients of micro-batches are averaged, so k micro-batches of size b give the update of one batch of k*b.
    With `dynamic_loss_scale` (fp16), a step whose gradients are not finite is skipped (counted in
    `skipped_steps`) and the scale halved; after `scale_window` good steps it doubles.
    """

    def __init__(self, params, optimizer, accumulation_steps=1, max_grad_norm=0.0, dynamic_loss_scale=False,
                 init_loss_scale=2.0 ** 16, scale_window=2000, world_size=1, row_norms=None):
        # no name prefixes: the rows keep their model names, the state its own (accum.<row>, exp_avg.<row> ...)
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.optimizer = optimizer
        self.loss_scale = Parameter(Tensor(init_loss_scale if dynamic_loss_scale else 1.0, ms.float32),
                                    name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="good_steps", requires_grad=False)
        self.skipped_steps = Parameter(Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.accum = self.params.clone(prefix="accum", init="zeros")
        for buffer in self.accum:
            buffer.requires_grad = False  # state, not trainable (clone copies the flag)
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.dynamic_loss_scale = dynamic_loss_scale
        self.scale_window = scale_window
        self.world_size = world_size
        self.all_reduce = ops.AllReduce() if world_size > 1 else None
        # --embedding_norm preserve: each row's norm after every update, [n, 1] per parameter
        self.row_norms = None if row_norms is None else [Tensor(n, ms.float32).reshape(-1, 1) for n in row_norms]

    def construct(self, lr, apply_update, scaled_loss, grads):
        """The micro-batch's loss (unscaled) after taking in its gradients `grads` of `scaled_loss`."""
        for i in range(len(self.accum)):
            ops.assign_add(self.accum[i], grads[i] / self.accumulation_steps)
        if apply_update:
            scaled_loss = ops.depend(scaled_loss, self._update(lr))
        return scaled_loss / self.loss_scale

    # The helpers below return a value, even where no caller needs it: in a graph, a call that returns nothing under
    # a tensor's `if` becomes a Python-fallback node, and a graph with one cannot be saved to the compile cache.

    def _update(self, lr):
        """Apply the accumulated gradients; returns whether they were finite."""
        grads = []
        for i in range(len(self.accum)):
            grad = self.accum[i] / self.loss_scale
            if self.all_reduce is not None:
                grad = self.all_reduce(grad) / self.world_size
            grads.append(grad)
        finite = ops.isfinite(ops.stack([ops.sum(g) for g in grads])).all()
        if finite:
            if self.max_grad_norm > 0:
                grads = self._clip(grads)
            self.optimizer(grads, lr)
            if self.row_norms is not None:
                self._renormalise()
        else:
            ops.assign_add(self.skipped_steps, Tensor(1, ms.int32))
        if self.dynamic_loss_scale:
            self._update_loss_scale(finite)
        for i in range(len(self.accum)):
            ops.assign(self.accum[i], ops.zeros_like(self.accum[i]))
        return finite

    def _renormalise(self):
        """Scale each learned row back to its norm in `row_norms` (OneTrainer's "preserve embedding norm"); returns
        the rows' norms before."""
        before = []
        for i in range(len(self.params)):
            rows = self.params[i]
            norms = ops.sqrt(ops.sum(ops.square(rows), 1, keepdim=True))
            ops.assign(rows, rows * (self.row_norms[i] / norms))
            before.append(norms)
        return before

    def _clip(self, grads):
        """Scale all gradients by min(1, max_norm / global_norm), as torch's clip_grad_norm_."""
        total = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
        coef = ops.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        return [g * coef for g in grads]

    def _update_loss_scale(self, finite):
        """Double the loss scale after `scale_window` finite steps in a row, halve it after one that is not;
        returns the count of finite steps in a row."""
        if finite:
            good = self.good_steps + 1
            if good >= self.scale_window:
                ops.assign(self.loss_scale, self.loss_scale * 2.0)
                good = good * 0
        else:
            ops.assign(self.loss_scale, ops.maximum(self.loss_scale / 2.0, 1.0))
            good = self.good_steps * 0
        ops.assign(self.good_steps, good)
        return good

    def state_parameters(self):
        """Everything besides the learned rows that must be saved to resume exactly."""
        return self.optimizer.state_parameters() + [self.loss_scale, self.good_steps, self.skipped_steps]


class TextualInversionTrainStep(nn.Cell):
    """One micro-batch, compiled as one graph: the gradients of `loss_net(*inputs)` with respect to `params` (the
    learned rows), then the `GradientUpdate` (its keyword options are that cell's). Call with `apply_update` True on
    the last micro-batch of a step."""

    def __init__(self, loss_net, params, optimizer, **update_options):
        super().__init__(auto_prefix=False)
        self.update = GradientUpdate(params, optimizer, **update_options)
        # Held as an attribute, not only inside grad_fn: a graph loaded from the compile cache finds its parameters
        # among its cell's own, and would read the model's weights as garbage otherwise.
        self.scaled_loss = ScaledLoss(loss_net, self.update.loss_scale)
        self.grad_fn = ms.value_and_grad(self.scaled_loss, None, self.update.params)

    def construct(self, lr, apply_update, *inputs):
        scaled_loss, grads = self.grad_fn(*inputs)
        return self.update(lr, apply_update, scaled_loss, grads)


def compile_ahead(train_step, lr, apply_update, *inputs):
    """Compile a `TextualInversionTrainStep`'s graph for these arguments before their first call, then give the heap
    the compiler freed back to the system (`release_free_memory`): otherwise glibc keeps it and the step's
    activations come on top (the small config at 512 px on the CPU: the step's peak 8.58 GB against 9.12 GB). A
    `BlockwiseTrainStep` compiles its graphs one by one as it runs them: nothing to compile ahead."""
    if isinstance(train_step, TextualInversionTrainStep):
        train_step.compile(lr, apply_update, *inputs)
        release_free_memory()


class BlockwiseLoss:
    """`TextualInversionLoss` with the UNet run layer by layer from the host (`BlockwiseUNet`), for the full-size
    model on the CPU, where one graph of the whole loss (and its gradients) does not fit in memory at 1024 px (at
    512 px it fits: README 'Running the real SDXL'). Around the UNet, small graphs: the text conditioning, the
    noised latents the UNet takes, and the loss from the UNet's output. Called, it gives each sample's loss [B] (the
    validation loss); `BlockwiseTrainStep` differentiates it."""

    def __init__(self, loss_net):
        self.conditioner = loss_net.conditioner
        self.unet_inputs = UNetInputs(loss_net)
        self.per_sample_loss = LossFromUNetOutput(loss_net, mean=False)
        self.unet = BlockwiseUNet(loss_net.model.diffusion_model)

    def __call__(self, moments, latent_noise, noise, sigma_rand, *cond_inputs):
        output, after_unet = self.unet_output(moments, latent_noise, noise, sigma_rand, cond_inputs)
        return self.per_sample_loss(output, *after_unet)

    def unet_output(self, moments, latent_noise, noise, sigma_rand, cond_inputs, keep=False):
        """(the UNet's output, or (output, tape) with `keep`; what `LossFromUNetOutput` takes besides it)."""
        context, vector = self.conditioner(*cond_inputs)
        unet_x, timesteps, *after_unet = self.unet_inputs(moments, latent_noise, noise, sigma_rand)
        return self.unet.forward(unet_x, timesteps, context, vector, keep=keep), after_unet


class BlockwiseTrainStep:
    """`TextualInversionTrainStep` over a `BlockwiseLoss` (`--blockwise_unet`): the UNet's forward pass keeps each
    layer's inputs, the loss's gradient with respect to the UNet's output goes back through the layers, and the
    conditioning's backward pass (a graph of its own) takes it to the learned rows. The same numbers as the one
    graph (tested on the tiny model)."""

    def __init__(self, loss_net, params, optimizer, **update_options):
        self.update = GradientUpdate(params, optimizer, **update_options)
        self.loss = BlockwiseLoss(loss_net)
        self.loss_and_grad = LossAndOutputGradient(ScaledLoss(LossFromUNetOutput(loss_net), self.update.loss_scale))
        self.conditioning_backward = ConditioningBackward(loss_net.conditioner, self.update.params)

    def __call__(self, lr, apply_update, moments, latent_noise, noise, sigma_rand, *cond_inputs):
        (output, tape), after_unet = self.loss.unet_output(moments, latent_noise, noise, sigma_rand, cond_inputs,
                                                           keep=True)
        scaled_loss, d_output = self.loss_and_grad(output, *after_unet)
        d_context, d_vector = self.loss.unet.backward(tape, d_output)
        grads = self.conditioning_backward(d_context, d_vector, *cond_inputs)
        # mutable: a plain tuple of Tensors is a constant to the graph, which would compile again at every call
        return self.update(lr, apply_update, scaled_loss, ms.mutable(tuple(grads)))


class UNetInputs(nn.Cell):
    """`TextualInversionLoss` up to the UNet: (its input, its timesteps) and what the loss needs after it."""

    def __init__(self, loss_net):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net

    def construct(self, moments, latent_noise, noise, sigma_rand):
        net = self.loss_net
        latents, noised, sigmas = net.noised_latents(moments, latent_noise, noise, sigma_rand)
        unet_x, timesteps, c_skip, c_out = net.denoiser.network_inputs(noised, sigmas)
        return unet_x, timesteps, latents, noised, c_skip, c_out, net.loss_fn.weights(sigmas, latents.ndim)


class LossFromUNetOutput(nn.Cell):
    """`TextualInversionLoss` after the UNet: the loss given the UNet's output (the mean, or each sample's)."""

    def __init__(self, loss_net, mean=True):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.mean = mean

    def construct(self, output, latents, noised, c_skip, c_out, w):
        denoised = self.loss_net.denoiser.combine(output, noised, c_skip, c_out)
        loss = self.loss_net.loss_fn.get_loss(denoised, latents, w)
        return loss.mean() if self.mean else loss


class LossAndOutputGradient(nn.Cell):
    """(the loss, its gradient with respect to the UNet's output) of `loss_net(output, *rest)`."""

    def __init__(self, loss_net):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net  # held: see TextualInversionTrainStep
        self.value_and_grad = ms.value_and_grad(loss_net, grad_position=0)

    def construct(self, output, *rest):
        return self.value_and_grad(output, *rest)


class ConditioningBackward(nn.Cell):
    """The gradients of `params` (the learned rows) given those of the conditioner's outputs (context, vector)."""

    def __init__(self, conditioner, params):
        super().__init__(auto_prefix=False)
        self.conditioner = conditioner
        self.params = params
        self.grads = ops.GradOperation(get_by_list=True, sens_param=True)

    def construct(self, d_context, d_vector, *cond_inputs):
        return self.grads(self.conditioner, self.params)(*cond_inputs, (d_context, d_vector))
