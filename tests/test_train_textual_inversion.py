"""Textual-inversion training end to end on the tiny SDXL (its config's default weights: the shipped
`checkpoints/sd_xl_tiny_shapes.safetensors`), in graph mode.

A train graph takes about 40 s of CPU to compile, so this module compiles few. One in-process `Training` (the
trainer's own setup: 2 vectors from "toy", batch 1, 2 accumulation steps) is shared by the tests through a module
fixture and reset between them. The command-line runs (A: batch 2, 8 steps, its graphs saved to a compile cache; A
again elsewhere, loading them; B: A resumed from step 4; Ctrl-C then --resume latest then kill -9, in fp16; msrun
with 2 workers) run one after another in a background thread from the module's start, beside the in-process tests; a
test that reads a run waits for it (also: --bucketing with two words on square and wide images: two graphs). Where a
run and the in-process step are compared, the in-process side is fed exactly what the run drew. Three more runs
cannot finish: their learned rows overflow, the disk fills at a save, or their tokenizers stop reaching the learned
rows (the export check refuses the file). The validation loss (a graph of its own) runs in A, B, the msrun workers
(on 16 draws), the bucketing run (8 draws, a graph per bucket) and in process; the other runs turn it off.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import safetensors.numpy
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

import mindspore as ms
from mindspore import Tensor, ops

from gm.data.dataset import BUCKET_MULTIPLE, EpochOrder
from gm.models.autoencoder import AutoencoderKL
from gm.models.loading import load_config
from gm.modules.diffusionmodules.blockwise import BlockwiseDenoiser
from gm.sampling import SDXLPipeline, image_size_multiple
from gm.textual_inversion.checkpointing import (
    LOCK_FILE, MODEL_NAME, STATE_DIR, ResumeError, load_train_state, read_train_state, save_learned_embeddings,
)
from gm.modules.encoders.tokenizer import bigg_tokenizer, vit_l_tokenizer
from gm.textual_inversion import encoding_check
from gm.textual_inversion.embedding_io import LearnedEmbedding, load_embedding
from gm.textual_inversion.loss_log import LossLog
from gm.textual_inversion.optim import learning_rate
from gm.textual_inversion.train_step import BlockwiseTrainStep, TextualInversionLoss, compile_ahead, loss_inputs
from gm.textual_inversion.validation import VALIDATION_KEY
from tools.shape_detector import concept_score, detect
import train_textual_inversion
from train_textual_inversion import (
    Training, check_args, draw_micro_batch, parse_args, resolve_defaults, rows_digest, schedule_changed,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_textual_inversion.py")
TINY = os.path.join(ROOT, "configs", "training", "sd_xl_tiny_textual_inversion.yaml")
DATA = os.path.join(ROOT, "datasets", "synthetic_toy")
NUM_IMAGES = 8
# Two vectors, started from the word "toy"; no clipping, so the gradients compared below are the raw ones.
BASE = ["--config", TINY, "--data_path", DATA, "--device_target", "CPU", "--placeholder_token", "<toy>",
        "--num_vectors", "2", "--initializer_token", "toy", "--max_grad_norm", "0"]
LR = 5e-4  # the default --learning_rate, constant
ROW_SHAPES = [(2, 32), (2, 64)]
ENCODERS, TOKENS = ("clip_l", "clip_g"), ("<toy>", "<toy>_1")
TIMEOUT = 900  # seconds for any one command-line run (a compile takes ~40 s; the machine may be shared)
VALIDATION_OFF = ["--validation_interval", "0"]  # the runs that do not test it save its graph's compile
VALIDATION_DRAWS = 16  # the command-line runs' (2 per image): cheap, and the same in A, B and the msrun workers


# ------------------------------------------------------------------------------------- command-line runs


def env():
    """The test's Python first on PATH: msrun starts its workers with the `python` it finds there."""
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                PYTHONUNBUFFERED="1")


class Runs:
    """Chains of command-line runs, one after another in one background thread (one trainer at a time beside the
    tests in this process: more at once only oversubscribe the CPU, whose compiles then cost more in all). A chain's
    processes are killed (by their own process group) if the module ends first."""

    def __init__(self, root):
        self.root, self.results, self.done, self.processes, self.stopped = root, {}, {}, [], False
        self.lock = threading.Lock()  # no process starts while stop_all runs

    def start(self, chains):
        """Run `chains` ({name: chain function}) in their order."""
        self.done = {name: threading.Event() for name in chains}

        def target():
            for name, chain in chains.items():
                try:
                    self.results[name] = chain(self, os.path.join(self.root, name))
                except BaseException as e:  # noqa: BLE001 - handed to the test that reads the chain
                    self.results[name] = e
                self.done[name].set()

        threading.Thread(target=target, daemon=True).start()

    def get(self, name):
        self.done[name].wait(timeout=3 * TIMEOUT * len(self.done))
        result = self.results.get(name, TimeoutError(f"chain {name} did not finish"))
        if isinstance(result, BaseException):
            raise result
        return result

    def popen(self, argv, cwd, log):
        with self.lock:
            if self.stopped:
                raise RuntimeError("the module ended: no more runs")
            out = open(log, "w")
            process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env(),
                                       start_new_session=True)
            self.processes.append(process)
            return process

    def cli(self, args, folder, name, python=(sys.executable,)):
        """Run the trainer to completion in `folder`; (return code, its output)."""
        os.makedirs(folder, exist_ok=True)
        log = os.path.join(folder, f"{name}.log")
        process = self.popen([*python, SCRIPT, *args], folder, log)
        process.wait(timeout=TIMEOUT)
        with open(log) as f:
            return process.returncode, f.read()

    def stop_all(self):
        with self.lock:
            self.stopped = True
            for process in self.processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def loss_rows(save_path):
    path = os.path.join(save_path, "loss.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.strip().split(",") for line in f.readlines()[1:] if line.endswith("\n")]


def last_step(save_path):
    rows = loss_rows(save_path)
    return int(rows[-1][0]) if rows else -1


def wait_for_steps(process, save_path, steps):
    deadline = time.time() + TIMEOUT
    while last_step(save_path) < steps:
        assert process.poll() is None, f"the run ended (code {process.returncode}) before step {steps}"
        assert time.time() < deadline, f"no step {steps} after {TIMEOUT} s"
        time.sleep(0.2)


def resume_chain(runs, root):
    """A: batches of 2, 8 steps saving every 4 (keeping one numbered embedding), its graphs saved to a compile
    cache; A again elsewhere (loading them); B: resumed from A's step 4."""
    a, again, b = os.path.join(root, "A"), os.path.join(root, "A_again"), os.path.join(root, "B")
    common = BASE + ["--train_batch_size", "2", "--total_step", "8", "--save_interval", "4",
                     "--validation_draws", str(VALIDATION_DRAWS)]
    cached = common + ["--max_num_ckpt", "1", "--compile_cache", os.path.join(root, "compile_cache")]
    code_a, out_a = runs.cli(cached + ["--save_path", a], root, "A")
    assert code_a == 0, out_a
    code_again, out_again = runs.cli(cached + ["--save_path", again], root, "A_again")
    step_4 = os.path.join(a, STATE_DIR, "step_00000004")
    code_b, out_b = runs.cli(common + ["--save_path", b, "--resume", step_4], root, "B")
    return {"A": a, "out_A": out_a, "A_again": again, "code_again": code_again, "out_again": out_again,
            "cache": os.path.join(root, "compile_cache"), "B": b, "code_B": code_b, "out_B": out_b}


def signal_chain(runs, root):
    """fp16. Ctrl-C after a few steps; then --resume latest with a state saved every step, killed (-9)."""
    save = os.path.join(root, "run")
    os.makedirs(root)
    args = [sys.executable, SCRIPT, *BASE, *VALIDATION_OFF, "--precision", "fp16", "--total_step", "100000",
            "--save_path", save]
    first = runs.popen(args + ["--save_interval", "100000"], root, os.path.join(root, "first.log"))
    wait_for_steps(first, save, 3)
    first.send_signal(signal.SIGINT)
    first.wait(timeout=TIMEOUT)
    interrupted = last_step(save)
    with open(os.path.join(save, STATE_DIR, "latest")) as f:
        latest_after_interrupt = f.read().strip()
    # keep what the interrupted run left (the next run prunes old states)
    kept = os.path.join(root, "after_interrupt")
    shutil.copytree(save, kept)
    second = runs.popen(args + ["--save_interval", "1", "--max_num_ckpt", "2", "--resume", "latest"], root,
                        os.path.join(root, "second.log"))
    wait_for_steps(second, save, interrupted + 4)
    second.kill()  # SIGKILL: no handler runs
    second.wait(timeout=60)
    with open(os.path.join(root, "first.log")) as f1, open(os.path.join(root, "second.log")) as f2:
        return {"save": save, "kept": kept, "code_first": first.returncode, "out_first": f1.read(), "interrupted": interrupted,
                "latest_after_interrupt": latest_after_interrupt, "code_second": second.returncode,
                "out_second": f2.read()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_chain(runs, root):
    """msrun with 2 CPU workers, 2 steps, batch 1 each (an effective batch of 2)."""
    os.makedirs(root)
    logs, save = os.path.join(root, "logs"), os.path.join(root, "out")
    argv = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
            f"--log_dir={logs}", SCRIPT, *BASE, "--is_parallel", "True", "--total_step", "2", "--save_path", save,
            "--validation_draws", str(VALIDATION_DRAWS)]
    process = runs.popen(argv, root, os.path.join(root, "msrun.out"))
    process.wait(timeout=TIMEOUT)
    worker_logs = []
    for rank in range(2):
        with open(os.path.join(logs, f"worker_{rank}.log")) as f:
            worker_logs.append(f.read())
    return {"root": root, "save": save, "code": process.returncode, "worker_logs": worker_logs}


# The trainer, with the disk filling up while the training state of step 4 is written: half a file, then ENOSPC.
DISK_FULL = """
import errno, os, runpy, sys
import mindspore as ms

real_save_checkpoint = ms.save_checkpoint


def save_checkpoint(params, path, *args, **kwargs):
    if "step_00000004.tmp" in path:
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save_checkpoint(params, path, *args, **kwargs)


ms.save_checkpoint = save_checkpoint
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


# The trainer, whose tokenizers forget the placeholder once step 2's training state is saved: from then on they
# split it into ordinary pieces, so its learned rows are never looked up (as with a token the tokenizer cannot hold).
ROWS_NOT_REACHED = """
import os, runpy, sys

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
from gm.modules.encoders import tokenizer
from gm.textual_inversion import checkpointing

bare = {tokenizer.VIT_L_PAD_ID: tokenizer.vit_l_tokenizer(), tokenizer.BIGG_PAD_ID: tokenizer.bigg_tokenizer()}
forgotten = []
real_call, real_save_train_state = tokenizer.CLIPTokenizer.__call__, checkpointing.save_train_state


def call(self, texts):
    return real_call(bare[self.pad_id] if forgotten else self, texts)


def save_train_state(save_path, step, *args):
    final = real_save_train_state(save_path, step, *args)
    forgotten.append(step)
    return final


tokenizer.CLIPTokenizer.__call__ = call
checkpointing.save_train_state = save_train_state
runpy.run_path(script, run_name="__main__")
"""


def failures_chain(runs, root):
    """Saving every step, a warm-up whose second step's learning rate (5e38) overflows float32: the rows turn
    inf at step 2. Then, saving every 2 steps, a full disk at step 4's training state; and tokenizers that no longer
    reach the learned rows after step 2's save."""
    diverged, disk_full = os.path.join(root, "diverged"), os.path.join(root, "disk_full")
    not_reached = os.path.join(root, "not_reached")
    code_d, out_d = runs.cli(BASE + VALIDATION_OFF + ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
                                     "--learning_rate", "1e39", "--total_step", "4", "--save_interval", "1",
                                     "--save_path", diverged], root, "diverged")
    code_f, out_f = runs.cli(BASE + VALIDATION_OFF + ["--total_step", "6", "--save_interval", "2", "--save_path", disk_full], root,
                             "disk_full", python=[sys.executable, "-c", DISK_FULL])
    code_n, out_n = runs.cli(BASE + VALIDATION_OFF + ["--total_step", "6", "--save_interval", "2",
                                                      "--save_path", not_reached], root, "not_reached",
                             python=[sys.executable, "-c", ROWS_NOT_REACHED])
    return {"diverged": diverged, "code_diverged": code_d, "out_diverged": out_d,
            "disk_full": disk_full, "code_disk_full": code_f, "out_disk_full": out_f,
            "not_reached": not_reached, "code_not_reached": code_n, "out_not_reached": out_n}


def bucketing_chain(runs, root):
    """--bucketing True with two words: <toy> (BASE: 2 vectors) on 4 square and 2 wide (3:2) toy images, <dot>
    (--concept: 1 vector, the style templates) on one of each, both started from "toy"; 6 steps of batch 2 (the
    words in turn: each bucket of each word reached), saved at each, no weight decay (so a row without gradient
    stays as it is at step 1), with the validation loss at the start and the end (8 draws, one per image, in
    batches of 2: each batch of one size); then --resume latest without --bucketing, which must be refused."""
    data, dots, save = (os.path.join(root, name) for name in ("data", "dots", "run"))
    os.makedirs(data)
    os.makedirs(dots)
    for i in range(8):
        image = Image.open(os.path.join(DATA, f"toy_{i:02d}.png"))
        folder = data if i < 6 else dots
        (image if i in (0, 1, 2, 3, 6) else image.resize((384, 256))).save(os.path.join(folder, f"toy_{i:02d}.png"))
    args = [data if a == DATA else a for a in BASE] + ["--concept", f"<dot>:{dots}:1:style", "--train_batch_size", "2",
                                                       "--total_step", "6", "--save_interval", "1",
                                                       "--validation_interval", "6", "--adam_weight_decay", "0",
                                                       "--save_path", save]
    code, out = runs.cli(args + ["--bucketing", "True", "--validation_draws", "8"], root, "run")
    refused = subprocess.run([sys.executable, SCRIPT, *args, "--resume", "latest"], capture_output=True, text=True,
                             timeout=TIMEOUT, env=env())
    return {"save": save, "dots": dots, "code": code, "out": out, "refused": refused}


CHAINS = {"resume": resume_chain, "signals": signal_chain, "parallel": parallel_chain, "failures": failures_chain,
          "bucketing": bucketing_chain}
FIXTURE_CHAINS = {"resume_runs": "resume", "signal_runs": "signals", "parallel_run": "parallel",
                  "failure_runs": "failures", "bucketing_run": "bucketing"}


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    """Start the chains the selected tests of this module need, in the order the tests first read them."""
    runs = Runs(str(tmp_path_factory.mktemp("cli_runs")))
    needed = {}
    for item in request.session.items:
        if item.module is request.module:
            for name in item.fixturenames:
                if name in FIXTURE_CHAINS:
                    needed.setdefault(FIXTURE_CHAINS[name], CHAINS[FIXTURE_CHAINS[name]])
    runs.start(needed)
    yield runs
    runs.stop_all()


@pytest.fixture(scope="module")
def resume_runs(runs):
    return runs.get("resume")


@pytest.fixture(scope="module")
def signal_runs(runs):
    return runs.get("signals")


@pytest.fixture(scope="module")
def parallel_run(runs):
    return runs.get("parallel")


@pytest.fixture(scope="module")
def failure_runs(runs):
    return runs.get("failures")


@pytest.fixture(scope="module")
def bucketing_run(runs):
    return runs.get("bucketing")



# ------------------------------------------------------------------------------------- in-process training


class Harness:
    """The trainer's `Training` (gradient accumulation 2, batch 1) with its initial state, to start tests
    from the same point."""

    def __init__(self, training):
        self.training = training
        self.buffers = list(training.state_params) + list(training.train_step.update.accum)
        self.initial = [p.asnumpy().copy() for p in self.buffers]

    def reset(self):
        # ops.assign, not set_data: after the train graph (which assigns these inside its `if apply_update`
        # branch) is compiled, set_data gives the Parameter a new buffer the graph no longer sees (MindSpore 2.10)
        for param, value in zip(self.buffers, self.initial):
            ops.assign(param, Tensor(value.copy(), param.dtype))  # a copy: a Tensor may share its array's memory

    def initial_rows(self):
        return self.initial[:2]

    def step(self, micro_batches, lr=LR):
        """One optimizer step over the given micro-batch inputs; their losses."""
        losses = []
        for i, inputs in enumerate(micro_batches):
            loss = self.training.train_step(Tensor(lr, ms.float32), Tensor(i == len(micro_batches) - 1), *inputs)
            losses.append(float(loss.asnumpy()))
        return losses

    def state(self):
        """(rows, exp_avg, exp_avg_sq) as lists of arrays per encoder."""
        optimizer = self.training.optimizer
        return ([p.asnumpy().copy() for p in self.training.learned_rows],
                [m.asnumpy().copy() for m in optimizer.exp_avg], [v.asnumpy().copy() for v in optimizer.exp_avg_sq])


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    args = parse_args(BASE + ["--gradient_accumulation_steps", "2",
                              "--save_path", str(tmp_path_factory.mktemp("in_process"))])
    config = load_config(args.config)
    resolve_defaults(args, config)
    check_args(args)
    calls = []
    original = AutoencoderKL.encode_moments

    def counting(self, x):
        calls.append(x.shape)
        return original(self, x)

    AutoencoderKL.encode_moments = counting  # stays until the module ends: training must never encode
    try:
        harness = Harness(Training(args, config))
        harness.encoder_calls = calls
        yield harness
    finally:
        AutoencoderKL.encode_moments = original


def micro_batch(training, rank=0, world_size=1, seed_key=(0, 0), order=None):
    """A micro-batch drawn as the trainer draws it (rank's data shard and noise stream)."""
    if order is None:
        order = EpochOrder(NUM_IMAGES, 1, 42, rank, world_size)
    rng = np.random.RandomState([42, rank, *seed_key])
    return draw_micro_batch(training.model, training.datasets[0], training.latents[0], order, rng)


def relative_difference(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_only_the_two_new_rows_train(harness):
    """Trainable: the two [2, d] rows, nothing else (no table gradient, no optimizer state for the tables);
    after training steps every other weight, both 49,408-row tables included, is bit-identical."""
    harness.reset()
    training = harness.training
    model, learned, step = training.model, training.learned_rows, training.train_step
    assert [p.name for p in learned] == ROW_NAMES
    # building the train step renamed nothing: the model's parameters keep the checkpoint's names
    assert all(name == p.name for name, p in model.parameters_and_names())
    assert {p.name for p in training.state_params} == {*ROW_NAMES, *(f"exp_avg{sq}.{n}" for sq in ("", "_sq") for n in
                                                                     ROW_NAMES), "adam_step", "loss_scale",
                                                       "good_steps", "skipped_steps"}
    assert [tuple(p.shape) for p in learned] == ROW_SHAPES
    assert [p.name for p in model.trainable_params()] == [p.name for p in learned]
    assert [p.name for p in step.trainable_params()] == [p.name for p in learned]
    assert list(training.optimizer.params) == learned and list(step.update.params) == learned
    state = training.optimizer.state_parameters() + list(step.update.accum)
    assert sorted(tuple(p.shape) for p in state) == sorted(ROW_SHAPES * 3 + [()])  # m, v, accum, Adam's step
    tables = [e.token_embedding.weight for e in model.conditioner.text_embedders()]
    assert [tuple(t.shape) for t in tables] == [(49408, 32), (49408, 64)] and not any(t.requires_grad for t in tables)
    frozen = {name: p.asnumpy().copy() for name, p in model.parameters_and_names() if p.name not in
              {q.name for q in learned}}

    # the gradient of one micro-batch (no update yet): rows-shaped and non-zero, in the accumulators
    training.train_step(Tensor(LR, ms.float32), Tensor(False), *micro_batch(training))
    assert [tuple(a.shape) for a in step.update.accum] == ROW_SHAPES
    assert all((np.abs(a.asnumpy()).max(1) > 0).all() for a in step.update.accum)
    harness.reset()

    for i in range(3):
        training.run_step(i, LR)
    for name, param in model.parameters_and_names():
        if name in frozen:
            assert np.array_equal(param.asnumpy(), frozen[name]), f"{name} changed"
    assert len(frozen) == len(list(model.parameters_and_names())) - 2
    for rows, start in zip(training.rows(), harness.initial_rows()):
        assert (np.abs(rows - start).max(1) > 0).all()  # every vector of both encoders moved


def test_blockwise_step_equals_the_one_graph_step(harness):
    """--blockwise_unet (the UNet layer by layer from the host, layers of one shape sharing a graph, each recomputed
    for its input gradients) gives the one-graph step's loss and gradients, then its optimizer state, and the
    validation graph's per-sample losses."""
    training = harness.training
    step = training.train_step
    blockwise = BlockwiseTrainStep(TextualInversionLoss(training.model), training.learned_rows, training.optimizer,
                                   accumulation_steps=2)
    unet = blockwise.loss.unet
    assert len(unet.graphs) < len(unet.program)  # some layers run through another layer's graph, weights swapped
    inputs = [micro_batch(training, seed_key=(500, m)) for m in range(2)]
    lr = Tensor(LR, ms.float32)

    def two_micro_batches(train_step):
        harness.reset()
        losses = [float(train_step(lr, Tensor(m == 1), *inputs[m]).asnumpy()) for m in range(2)]
        return losses, harness.state()

    losses, state = two_micro_batches(step)
    blockwise_losses, blockwise_state = two_micro_batches(blockwise)
    np.testing.assert_allclose(blockwise_losses, losses, rtol=1e-5)
    # AdamW's moments after the update (not the rows: its first step moves an element by about lr sign(g), and
    # a gradient element within rounding of zero may take either sign)
    for ours, theirs in zip(blockwise_state[1:], state[1:]):
        assert max(relative_difference(a, b) for a, b in zip(ours, theirs)) < 1e-3
    # one micro-batch's gradients, as accumulated
    harness.reset()
    step(lr, Tensor(False), *inputs[0])
    accum = [a.asnumpy().copy() for a in step.update.accum]  # asnumpy shares the buffer reset overwrites
    harness.reset()
    blockwise(lr, Tensor(False), *inputs[0])
    assert max(relative_difference(a.asnumpy(), b) for a, b in zip(blockwise.update.accum, accum)) < 1e-4
    harness.reset()
    # its forward pass alone: the validation loss, per sample (the trainer's evaluation graph: compiled once)
    per_sample = training.validation.net(*inputs[0]).asnumpy()
    np.testing.assert_allclose(blockwise.loss(*inputs[0]).asnumpy(), per_sample, rtol=1e-5)


def test_initializer_word_starts_every_vector(harness):
    """--initializer_token toy: both vectors of both encoders start as the table row of "toy"."""
    for embedder, start in zip(harness.training.model.conditioner.text_embedders(), harness.initial_rows()):
        (toy,) = embedder.tokenizer.encode("toy")
        row = embedder.token_embedding.weight.asnumpy()[toy]
        assert np.array_equal(start, np.stack([row, row]))
        assert np.abs(row).max() > 0


def test_training_learns_the_toy(harness):
    """On the shipped pretrained tiny SDXL (it has seen shapes, never the toy), the trainer's step on fresh draws
    lowers the trainer's validation loss (64 fixed held-out draws of image, flip, prompt, noise and timestep)
    against the initial embedding, and the samples of "a photo of <toy>" come to show more of the toy by the concept
    score (tools/shape_detector.py: shape, colour, ring and dot read off each sample; the score is the fraction of
    the 8 x 4 readings that are the toy's). Measured here after 30 steps: validation loss 0.15118 -> 0.14754; score
    0 -> 0.125, all of it the colour: red in 0 -> 4 of the 8 samples (they start as blue and green blobs). No sample
    shows a readable star, ring or dot, before or after: the model draws blobs (README, the concept score)."""
    training = harness.training
    assert len(training.validation.draws) == 64
    pipeline = SDXLPipeline(training.model, placeholders={"<toy>": 2})

    def measure():
        images = pipeline.generate("a photo of <toy>", steps=20, height=64, width=64, seed=0, num_images=8)
        return float(np.mean(training.validation.losses())), concept_score([detect(image) for image in images])

    harness.reset()
    loss_before, before = measure()
    data = EpochOrder(NUM_IMAGES, 1, 7)
    for step in range(30):
        harness.step([micro_batch(training, seed_key=(step, m), order=data) for m in range(2)], lr=5e-3)
    loss_after, after = measure()
    harness.reset()
    assert loss_after < loss_before - 1e-3, (loss_before, loss_after)
    assert after["score"] >= before["score"] + 2 / 32, (before, after)  # two more right readings of 32, at least


def test_latents_are_encoded_once_and_the_encoder_released(harness):
    """Every (image, flip) cached before training, by a child process on the CPU (the training process never
    runs the encoder: tests/test_latent_cache.py checks the child's latents), and the encoder is gone."""
    training = harness.training
    assert sorted(training.latents[0].cache) == sorted((i, f) for i in range(NUM_IMAGES) for f in (False, True))
    assert not hasattr(training.model.first_stage_model, "encoder") and training.latents[0].autoencoder is None
    assert not [n for n, _ in training.model.parameters_and_names() if n.startswith("first_stage_model.encoder.")]
    training.run_step(0, LR)  # draws from the cache
    assert harness.encoder_calls == []
    harness.reset()


def test_one_graph_per_bucket_size(harness):
    """A micro-batch of a new size (64x96, a wide bucket at 64 px) compiles the train step's graph for it at its
    first use; each graph is kept, so going back to the square compiles nothing."""
    training = harness.training
    assert image_size_multiple(training.model) == BUCKET_MULTIPLE  # every bucket's sides fit this model
    harness.reset()
    harness.step([micro_batch(training)])  # the square graph, compiled now if no test did before
    square = set(training.train_step.compile_cache)
    rng = np.random.RandomState(0)
    moments = rng.standard_normal((1, 8, 8, 12)).astype(np.float32) * 0.5  # [B, 2C, 64/8, 96/8]
    batch = {"txt": ["a photo of <toy> <toy>_1"], "original_size_as_tuple": np.array([[256, 384]]),
             "crop_coords_top_left": np.array([[0, 0]]), "target_size_as_tuple": np.array([[64, 96]])}
    wide = loss_inputs(training.model, moments, training.model.conditioner.tokenize(batch), rng)
    losses = harness.step([wide]) + harness.step([wide]) + harness.step([micro_batch(training)])
    compiled = set(training.train_step.compile_cache)
    harness.reset()
    assert np.isfinite(losses).all()
    assert square < compiled and len(compiled) == len(square) + 1


def test_a_new_shape_is_compiled_ahead_of_its_first_step(harness, monkeypatch):
    """The trainer compiles the train step's graph for a micro-batch shape it has not run before ahead of the call
    (`compile_ahead`, which then gives the compiler's freed heap back to the system before the step allocates its
    activations), and the step runs that graph: its calls compile no other."""
    training = harness.training
    ahead = []

    def recorded(train_step, *args):
        compile_ahead(train_step, *args)
        ahead.append(set(train_step.compile_cache))

    monkeypatch.setattr(train_textual_inversion, "compile_ahead", recorded)
    training.step_shapes.clear()  # as at a run's start
    training.run_step(0, LR)  # two micro-batches of one shape
    compiled = set(training.train_step.compile_cache)
    harness.reset()
    assert len(ahead) == 1 and ahead[0] == compiled


def test_bucketing_run(bucketing_run):
    """--bucketing True with two words: the summary names each word's buckets, the run trains through both sizes (a
    graph each, shared by the words) and writes each word's embedding; the validation loss covers every image at its
    bucket's size; resuming without --bucketing is refused before anything is built."""
    save, out = bucketing_run["save"], bucketing_run["out"]
    assert bucketing_run["code"] == 0, out
    assert "buckets (h x w)   : 64x64: 4, 64x96: 2 for <toy>" in out
    assert "buckets (h x w)   : 64x64: 1, 64x96: 1 for <dot>" in out
    # a graph per size, each compiled at its first step: the speed is that of the other steps
    assert out.count("Graph compiled in") == 2 and "2 graphs compiled in" in out
    rows = state_rows(read_state(save, 6))
    for word, vectors in (("toy", slice(0, 2)), ("dot", slice(2, 3))):
        embedding = load_embedding(os.path.join(save, f"{word}.safetensors"))
        assert np.array_equal(embedding.clip_l, rows[0][vectors]) and np.array_equal(embedding.clip_g, rows[1][vectors])
        assert os.path.exists(os.path.join(save, f"{word}_best.safetensors"))
    table = loss_rows(save)
    assert [int(r[0]) for r in table] == list(range(0, 7))
    assert np.isfinite([float(r[1]) for r in table[1:]]).all()
    # the validation loss at step 0 and at the end, over one draw of each of the 8 images (5 square, 3 wide)
    val = {int(r[0]): float(r[2]) for r in table if r[2]}
    assert sorted(val) == [0, 6] and np.isfinite(list(val.values())).all()
    draws = read_train_state(os.path.join(save, STATE_DIR, "step_00000006"), {})["validation"]["draws"]
    assert sorted((word, index) for word, index, *_ in draws) == [(0, i) for i in range(6)] + [(1, 0), (1, 1)]
    assert f"step 6: validation loss {val[6]:.5f}" in out
    assert OmegaConf.load(os.path.join(save, "args.yaml")).args.bucketing is True
    refused = bucketing_run["refused"]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (error,) = error_lines(refused.stderr)
    assert "cannot be resumed" in error and "  bucketing: saved {'train_batch_size': 2}, now None" in refused.stderr


def test_fp16_keeps_learned_rows_and_optimizer_state_fp32(tmp_path):
    """--precision fp16: the frozen model computes in fp16, the rows and every optimizer buffer stay fp32, and a
    dynamic loss scale is on (its skipping of non-finite steps: tests/test_train_optim.py)."""
    args = parse_args(BASE + ["--precision", "fp16", "--cache_latents", "False", "--save_path", str(tmp_path)])
    config = load_config(args.config)
    resolve_defaults(args, config)
    training = Training(args, config)
    assert training.model.model.diffusion_model.dtype == ms.float16
    assert [p.dtype for p in training.learned_rows] == [ms.float32, ms.float32]
    assert all(p.dtype == ms.float32 for p in training.train_step.update.state_parameters()[:5])  # m, v, Adam step
    assert all(p.dtype == ms.float32 for p in training.train_step.update.accum)
    update = training.train_step.update
    assert float(update.loss_scale.asnumpy()) == 2.0 ** 16 and update.dynamic_loss_scale


def test_validation_loss_and_sample_grids_share_one_compiled_unet(harness, tmp_path):
    """With sample grids on, the validation loss runs through the grids' sampling pipeline's denoiser, at the batch the
    grids call it at (their 3 images, twice for guidance), so a run compiles one UNet graph for both; its losses are
    those of the evaluation with a UNet graph of its own (the harness's: no grids, its draws all in one call)."""
    args = parse_args(BASE + ["--infer_during_train", "True", "--num_validation_images", "3",
                              "--save_path", str(tmp_path)])
    config = load_config(args.config)
    resolve_defaults(args, config)
    check_args(args)
    training = Training(args, config)
    validation, pipeline = training.validation, training.validation_pipeline
    assert validation.net.denoiser is pipeline.denoiser and validation.batch_size == 6
    losses = validation.losses()
    pipeline.generate("a photo of <toy>", steps=2, height=64, width=64, num_images=3)
    assert len(pipeline.denoiser.compile_cache) == 1  # the grid ran on the graph the validation compiled
    # the pipeline's graphs renamed nothing: the learned rows keep their names, the training state's keys
    assert all(name == p.name for name, p in training.model.parameters_and_names())
    harness.reset()
    own = harness.training.validation
    assert own.net.denoiser is not pipeline.denoiser and own.batch_size is None  # images_per_call: all 64 draws at once
    np.testing.assert_allclose(losses, own.losses(), rtol=1e-5)


def test_the_grids_sample_with_the_runs_memory_flags(tmp_path):
    """--blockwise_unet True and --vae_tiling True: the validation grids' pipeline runs its UNet layer by layer and
    decodes in tiles too (at full size on the CPU the one-graph UNet beside the training's does not fit), and the
    validation loss runs through the train step's layer graphs."""
    args = parse_args(BASE + ["--infer_during_train", "True", "--blockwise_unet", "True", "--vae_tiling", "True",
                              "--save_path", str(tmp_path)])
    config = load_config(args.config)
    resolve_defaults(args, config)
    check_args(args)
    training = Training(args, config)
    pipeline = training.validation_pipeline
    assert isinstance(pipeline.denoiser, BlockwiseDenoiser) and pipeline.vae_tiling
    assert training.validation.net is training.train_step.loss


def test_numbered_embeddings_are_pruned_and_the_best_kept(tmp_path):
    rows = np.zeros((1, 32), np.float32), np.zeros((1, 64), np.float32)
    save_learned_embeddings(str(tmp_path), "<toy>", *rows)
    save_learned_embeddings(str(tmp_path), "<toy>", *rows, step="best")
    for step in (2, 4, 6):
        save_learned_embeddings(str(tmp_path), "<toy>", *rows, step=step, max_num_ckpt=1)
    assert sorted(os.listdir(tmp_path)) == sorted([f"{MODEL_NAME}_6_ti.ckpt", f"{MODEL_NAME}_ti.ckpt",
                                                   f"{MODEL_NAME}_best_ti.ckpt", "toy.safetensors",
                                                   "toy_6.safetensors", "toy_best.safetensors"])


def test_loss_log_keeps_empty_cells_on_resume(tmp_path):
    """Step 0's row (validation loss and health only) and rows without a validation loss read back on resume;
    the rows after the resumed step are dropped, and the plot has both curves."""
    log = LossLog(str(tmp_path), 0, ENCODERS, ["<toy>"])
    log.append(0, None, None, None, [1.0, 1.0, 2.0, 1.0], val_loss=0.25)
    for step in (1, 2, 3):
        log.append(step, 0.1 * step, LR, 0.5, [1.0, 0.9, 2.0, 0.9], val_loss=0.2 if step == 2 else None)
    resumed = LossLog(str(tmp_path), 2, ENCODERS, ["<toy>"])
    assert (resumed.steps, resumed.losses) == ([1, 2], [0.1, 0.2])
    assert (resumed.val_steps, resumed.val_losses) == ([0, 2], [0.25, 0.2])
    assert resumed.health_steps == [0, 1, 2] and resumed.health[0] == [1.0, 1.0, 2.0, 1.0]
    with open(tmp_path / "loss.csv") as f:
        assert f.read().splitlines()[:3] == ["step,loss,val_loss,lr,seconds,clip_l_norm_<toy>,clip_l_cos_<toy>,"
                                             "clip_g_norm_<toy>,clip_g_cos_<toy>", "0,,0.250000,,,1,1,2,1",
                                             "1,0.100000,,0.0005,0.500,1,0.9,2,0.9"]
    resumed.plot()
    assert Image.open(tmp_path / "loss.png").size[0] > 100


# ------------------------------------------------------------------------------------- command-line results


def read_state(save_path, step):
    return ms.load_checkpoint(os.path.join(save_path, STATE_DIR, f"step_{step:08d}", "state.ckpt"))


ROW_NAMES = ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.new_embeddings",
             "conditioner.embedders.1.model.token_embedding.new_embeddings"]


def state_rows(state):
    return [state[name].asnumpy() for name in ROW_NAMES]


def test_outputs(resume_runs, harness):
    """The files of run A (8 steps, saved at 4 and 8, --max_num_ckpt 1) and what is in them."""
    a, out = resume_runs["A"], resume_runs["out_A"]
    assert sorted(os.listdir(a)) == sorted([f"{MODEL_NAME}_8_ti.ckpt", "toy_8.safetensors", f"{MODEL_NAME}_ti.ckpt",
                                            "toy.safetensors", f"{MODEL_NAME}_best_ti.ckpt", "toy_best.safetensors",
                                            "loss.csv", "loss.png", "args.yaml", STATE_DIR, LOCK_FILE])
    assert sorted(os.listdir(os.path.join(a, STATE_DIR))) == ["latest", "step_00000004", "step_00000008"]
    with open(os.path.join(a, STATE_DIR, "latest")) as f:
        assert f.read().strip() == "step_00000008"

    final = read_state(a, 8)
    rows = state_rows(final)
    for path in (f"{MODEL_NAME}_ti.ckpt", f"{MODEL_NAME}_8_ti.ckpt", "toy.safetensors", "toy_8.safetensors"):
        embedding = load_embedding(os.path.join(a, path))
        assert embedding.token == "<toy>" and embedding.num_vectors == 2
        assert np.array_equal(embedding.clip_l, rows[0]) and np.array_equal(embedding.clip_g, rows[1])
    community = safetensors.numpy.load_file(os.path.join(a, "toy.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in community.items()} == {"clip_l": ((2, 32), np.float32),
                                                                      "clip_g": ((2, 64), np.float32)}
    with safe_open(os.path.join(a, "toy.safetensors"), framework="np") as f:
        assert f.metadata()["token"] == "<toy>"

    # started from "toy" (the in-process model is the same: same config and seed): 8 Adam steps of lr 5e-4
    # move an entry by at most ~8 * 3.2 * lr, far less than a random start would differ (~0.05)
    for found, start in zip(rows, harness.initial_rows()):
        assert 0 < np.abs(found - start).max() < 8 * 3.2 * LR

    with open(os.path.join(a, "loss.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == ("step,loss,val_loss,lr,seconds," + ",".join(
        f"{encoder}_{figure}_{token}" for encoder in ENCODERS for figure in ("norm", "cos") for token in TOKENS))
    # step 0: the initial embedding's validation loss and health; the validation loss every 4 steps (the save
    # interval, the default)
    table = np.array([[float(v) if v else np.nan for v in line.split(",")] for line in lines[1:]])
    assert table[:, 0].tolist() == list(range(0, 9)) and np.isfinite(table[1:, 1]).all()
    assert np.isfinite(table[:, 2]).tolist() == [step % 4 == 0 for step in range(9)]
    assert (table[1:, 3] == LR).all() and (table[1:, 4] > 0).all() and np.isnan(table[0, [1, 3, 4]]).all()
    # each vector's health at step 8: its norm, and its cosine to its start (the word "toy"), computed here apart
    for k, (found, start) in enumerate(zip(rows, harness.initial_rows())):
        norms = np.sqrt((found.astype(np.float64) ** 2).sum(1))
        cosines = (found * start).sum(1) / norms / np.sqrt((start.astype(np.float64) ** 2).sum(1))
        health = table[-1, 5 + 4 * k: 9 + 4 * k]
        np.testing.assert_allclose(health, np.concatenate([norms, cosines]), rtol=2e-5)
        assert (cosines < 1).all() and (cosines > 0.9).all()  # moved a little, as 8 small steps do
        np.testing.assert_array_equal(table[0, 7 + 4 * k: 9 + 4 * k], [1, 1])  # step 0: at the start

    # the best: the embedding of the lowest validation loss, kept under --max_num_ckpt 1 (whose pruning removed
    # toy_4), with its step and loss; a step-4 best shows that pruning spares it
    val = {int(step): loss for step, loss in table[:, :3:2] if np.isfinite(loss)}
    best_step = min(val, key=val.get)
    best_rows = harness.initial_rows() if best_step == 0 else state_rows(read_state(a, best_step))
    for path in (f"{MODEL_NAME}_best_ti.ckpt", "toy_best.safetensors"):
        embedding = load_embedding(os.path.join(a, path))
        assert np.array_equal(embedding.clip_l, best_rows[0]) and np.array_equal(embedding.clip_g, best_rows[1])
        assert embedding.metadata["step"] == str(best_step)
        assert abs(float(embedding.metadata["val_loss"]) - val[best_step]) <= 1e-6
    assert f"best validation loss  : {val[best_step]:.5f} at step {best_step}, its embeddings: " in out
    assert f"step 8: validation loss {val[8]:.5f} (best {val[best_step]:.5f} at step {best_step})" in out
    with open(os.path.join(a, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert Image.open(os.path.join(a, "loss.png")).size[0] > 100

    saved = OmegaConf.load(os.path.join(a, "args.yaml"))
    assert saved.args.placeholder_token == "<toy>" and saved.args.num_vectors == 2
    assert saved.args.initializer_token == "toy" and saved.args.resolution == 64  # resolved from the config
    assert saved.args.weight.endswith(os.path.join("checkpoints", "sd_xl_tiny_shapes.safetensors"))  # the config's
    assert saved.args.save_path == a and saved.args.total_step == 8
    assert saved.resolved.effective_batch_size == 2 and saved.resolved.tokens == ["<toy>", "<toy>_1"]
    assert saved.config.model.target == "gm.models.diffusion.DiffusionEngine"

    assert "images found      : 8" in out and "trainable params  : 192 ((2, 32) + (2, 64))" in out
    assert out.count("Graph compiled in") == 1 and "then" in out.split("graph compiled in")[-1]
    summary = [line for line in out.splitlines() if line.startswith("  vectors clip_")]
    assert len(summary) == 2 and all(line.count("cosine to its start") == 2 for line in summary), summary


def test_resume_is_exact(resume_runs):
    """B, resumed from A's step-4 state, ends where A ended (rows, moments, losses of steps 5-8, the validation
    loss at step 8 and the best rows), with the same validation draws and the same best embedding."""
    assert resume_runs["code_B"] == 0, resume_runs["out_B"]
    a, b = read_state(resume_runs["A"], 8), read_state(resume_runs["B"], 8)
    assert sorted(a) == sorted(b) and {f"best.{name}" for name in ROW_NAMES} <= set(a)
    for name in a:
        np.testing.assert_allclose(b[name].asnumpy(), a[name].asnumpy(), rtol=0, atol=1e-6, err_msg=name)
    start = read_state(resume_runs["A"], 4)
    assert not np.array_equal(state_rows(start)[0], state_rows(a)[0])  # steps 5-8 did change the rows
    # step, loss, val_loss, lr of steps 5-8 (not the seconds)
    assert [r[:4] for r in loss_rows(resume_runs["B"])] == [r[:4] for r in loss_rows(resume_runs["A"])[5:]]
    hosts = [read_train_state(os.path.join(run, STATE_DIR, "step_00000008"), {})["validation"]
             for run in (resume_runs["A"], resume_runs["B"])]
    assert len(hosts[0]["draws"]) == VALIDATION_DRAWS and hosts[0]["noise_seed"] == [42, VALIDATION_KEY]
    assert hosts[1]["draws"] == hosts[0]["draws"] and hosts[1]["noise_seed"] == hosts[0]["noise_seed"]
    assert hosts[1]["best_step"] == hosts[0]["best_step"]
    best = [load_embedding(os.path.join(run, "toy_best.safetensors")) for run in (resume_runs["A"], resume_runs["B"])]
    assert best[1].metadata["step"] == best[0].metadata["step"] == str(hosts[0]["best_step"])
    np.testing.assert_allclose(best[1].clip_l, best[0].clip_l, rtol=0, atol=1e-6)


def test_a_run_again_loads_its_graphs_from_the_compile_cache_and_trains_the_same(resume_runs):
    """A again with the same arguments elsewhere: the graphs A compiled (the train step's, the validation's, the
    latent encoder's in its child) are loaded, none compiled, and the run is A's bit for bit (losses, validation
    losses, rows). Before `TextualInversionTrainStep` held its loss cell, the loaded step trained on NaN."""
    assert resume_runs["code_again"] == 0, resume_runs["out_again"]
    folders = os.listdir(resume_runs["cache"])
    assert len(folders) == 1 and folders[0].startswith("train-")  # where the outputs go is not in the key
    folder = os.path.join(resume_runs["cache"], folders[0])
    out_a, out_again = resume_runs["out_A"], resume_runs["out_again"]
    assert f"compile cache     : {folder} (new: " in out_a and "Graph compiled in" in out_a
    assert f"compile cache     : {folder} (the graphs of an earlier run" in out_again
    assert "Graph loaded from the compile cache in" in out_again and "Graph compiled" not in out_again
    assert os.path.exists(os.path.join(folder, "complete")) and os.path.exists(os.path.join(folder, "key.json"))
    assert os.listdir(os.path.join(folder, "latent_encoder", "rank_0", "graph_cache"))  # the encoding child's
    rows_a, rows_again = loss_rows(resume_runs["A"]), loss_rows(resume_runs["A_again"])
    assert [r[:3] for r in rows_again] == [r[:3] for r in rows_a] and len(rows_a) == 9  # step, loss, val_loss
    assert all(np.isfinite(float(r[1])) for r in rows_a[1:])
    for name in ("toy.safetensors", "toy_best.safetensors"):
        a, again = (safetensors.numpy.load_file(os.path.join(run, name)) for run in (resume_runs["A"],
                                                                                    resume_runs["A_again"]))
        assert sorted(a) == sorted(again)
        for key in a:
            np.testing.assert_array_equal(again[key], a[key])


def test_validation_loss_is_the_mean_loss_of_its_draws(resume_runs, harness):
    """Run A's validation loss at steps 0, 4 and 8 (all 16 draws in one batch) is the mean of its draws' losses,
    computed here apart, one draw at a time, at that step's rows: the draw's cached latent, its prompt, noise from
    RandomState(seed, VALIDATION_KEY, j) drawn as a training step draws its own, and its timestep (through the
    in-process trainer's evaluation graph: TextualInversionLoss per sample, so no graph compiles for this test).
    The draws: each image twice, once mirrored, a template prompt each, timesteps spread evenly."""
    a = resume_runs["A"]
    saved = read_train_state(os.path.join(a, STATE_DIR, "step_00000008"), {})["validation"]
    draws = saved["draws"]
    assert sorted((index, flipped) for _, index, flipped, *_ in draws) == sorted(
        (i, flipped) for i in range(NUM_IMAGES) for flipped in (False, True))
    assert [rand for *_, rand in draws] == [int((j + 0.5) * 1000 / VALIDATION_DRAWS) for j in range(VALIDATION_DRAWS)]
    assert all("<toy> <toy>_1" in prompt for _, _, _, prompt, _, _ in draws)  # the placeholder stands for 2 vectors
    val = {int(r[0]): float(r[2]) for r in loss_rows(a) if r[2]}
    assert sorted(val) == [0, 4, 8]

    training = harness.training
    model, net = training.model, training.validation.net
    for step, rows in ((0, harness.initial_rows()), (4, state_rows(read_state(a, 4))), (8, state_rows(read_state(a, 8)))):
        for param, value in zip(training.learned_rows, rows):
            ops.assign(param, Tensor(value))
        losses = []
        for j, (word, index, flipped, prompt, _, rand) in enumerate(draws):
            batch = dict(training.latents[word].batch([(index, flipped)]), txt=[prompt])
            moments = batch.pop("moments")
            inputs = loss_inputs(model, moments, model.conditioner.tokenize(batch),
                                 np.random.RandomState([42, VALIDATION_KEY, j]))
            losses.append(float(net(*inputs[:3], Tensor([rand], ms.int32), *inputs[4:]).asnumpy()[0]))
        assert abs(np.mean(losses) - val[step]) <= 2e-6, (step, np.mean(losses), val[step])
    harness.reset()


@pytest.mark.parametrize("change, key", [
    (["--placeholder_token", "<other>"], "words"),
    (["--num_vectors", "3"], "words"),
    (["--config", "{other_config}"], "model"),
])
def test_resume_refuses_another_run(resume_runs, tmp_path, change, key):
    a = resume_runs["A"]
    other_config = tmp_path / "other.yaml"
    config = OmegaConf.load(TINY)
    config.model.params.scale_factor = 0.18215
    OmegaConf.save(config, other_config)
    args = BASE + ["--total_step", "8", "--save_path", a, "--resume", "latest"]
    for flag, value in zip(change[::2], change[1::2]):
        args[args.index(flag) + 1] = value.replace("{other_config}", str(other_config))
    before = run_folder_times(a)
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be resumed" in errors[0], proc.stderr
    assert f"  {key}: saved" in proc.stderr
    assert run_folder_times(a) == before


def run_folder_times(folder):
    """{file: mtime} of a run folder's outputs; the lock file is left out: a run that refuses rewrites it with
    its process id while it holds it, as every run does."""
    return {os.path.relpath(os.path.join(root, n), folder): os.stat(os.path.join(root, n)).st_mtime_ns
            for root, _, names in os.walk(folder) for n in names if n != LOCK_FILE}


def test_ctrl_c_saves_and_resume_latest_continues(signal_runs):
    """SIGINT after 3+ steps: exit 130, a message, a loadable state and embedding at that step (fp16 run: rows
    and moments saved in fp32); --resume latest then continues from the next step."""
    s, kept, save = signal_runs["interrupted"], signal_runs["kept"], signal_runs["save"]
    assert signal_runs["code_first"] == 130, signal_runs["out_first"]
    assert f"Interrupted at step {s}" in signal_runs["out_first"] and "--resume latest" in signal_runs["out_first"]
    assert s >= 3 and signal_runs["latest_after_interrupt"] == f"step_{s:08d}"
    state = read_state(kept, s)
    rows = state_rows(state)
    assert all(r.dtype == np.float32 for r in rows) and state["exp_avg." + ROW_NAMES[0]].asnumpy().dtype == np.float32
    embedding = load_embedding(os.path.join(kept, f"{MODEL_NAME}_{s}_ti.ckpt"))
    assert np.array_equal(embedding.clip_l, rows[0]) and np.array_equal(embedding.clip_g, rows[1])

    out = signal_runs["out_second"]
    assert f"steps             : {s} -> 100000" in out
    steps = [int(r[0]) for r in loss_rows(save)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= s + 4  # continued, no step twice or lost


def test_kill_9_leaves_the_latest_state_complete(signal_runs, tmp_path):
    """kill -9 while saving every step: train_state/latest names a whole state that loads."""
    save, s = signal_runs["save"], signal_runs["interrupted"]
    assert signal_runs["code_second"] == -signal.SIGKILL
    with open(os.path.join(save, STATE_DIR, "latest")) as f:
        latest = os.path.join(save, STATE_DIR, f.read().strip())
    host = read_train_state(latest, {})
    step = host["step"]
    assert latest.endswith(f"step_{step:08d}") and step > s
    saved = ms.load_checkpoint(os.path.join(latest, "state.ckpt"))
    params = [ms.Parameter(Tensor(np.zeros(v.shape, v.asnumpy().dtype)), name=n) for n, v in saved.items()]
    load_train_state(latest, params)  # the trainer's own loader accepts it
    rows = state_rows(saved)
    assert [r.shape for r in rows] == ROW_SHAPES and all(r.dtype == np.float32 for r in rows)
    assert all(saved[n].asnumpy().dtype == np.float32 for n in saved if n.startswith(("exp_avg", "adam")))
    embedding = load_embedding(os.path.join(save, f"{MODEL_NAME}_{step}_ti.ckpt"))
    assert np.array_equal(embedding.clip_l, rows[0])
    with pytest.raises(ResumeError, match=r"words: saved \[\['<toy>', 2\]\], now \[\['<toy>', 3\]\]"):
        read_train_state(latest, dict(host["identity"], words=[["<toy>", 3]]))


def test_gradient_accumulation_matches_one_big_batch(resume_runs, harness):
    """k=2 micro-batches of 1 == one batch of 2: run A (--train_batch_size 2) against the in-process step with 2
    accumulation steps, fed A's two images per step split in two (same images, prompts, noise and noise levels,
    drawn as A drew them). After 4 optimizer steps Adam's moments (the mean gradient, its square) agree within
    1e-5 (relative), the rows to float32 rounding."""
    assert "effective batch   : 2 = 2 per device x 1 accumulation x 1 device(s)" in resume_runs["out_A"]
    training = harness.training
    order = EpochOrder(NUM_IMAGES, 2, 42)
    harness.reset()
    for step in range(4):
        batch = draw_micro_batch(training.model, training.datasets[0], training.latents[0], order,
                                 np.random.RandomState([42, 0, step, 0]))
        moments = batch[0].asnumpy()
        assert not np.array_equal(moments[0], moments[1])  # two images, so not the average of equal gradients
        harness.step([[Tensor(t.asnumpy()[i:i + 1]) for t in batch] for i in range(2)])
    rows, exp_avg, exp_avg_sq = harness.state()
    harness.reset()
    state = read_state(resume_runs["A"], 4)
    for i, name in enumerate(ROW_NAMES):
        assert relative_difference(exp_avg[i], state["exp_avg." + name].asnumpy()) <= 1e-5
        assert relative_difference(exp_avg_sq[i], state["exp_avg_sq." + name].asnumpy()) <= 1e-5
        found, start = state[name].asnumpy(), harness.initial_rows()[i]
        rounding = 8 * np.spacing(np.abs(found).max())
        assert np.abs(rows[i] - found).max() <= 1e-5 * np.abs(found - start).max() + rounding
        assert np.abs(found - start).max() > 100 * rounding  # the rows did move


def test_data_parallel_two_workers(parallel_run, resume_runs, harness):
    """msrun, 2 CPU workers, 2 steps: both finish with the same rows, only rank 0 writes, and the update is
    that of the two ranks' shards averaged: the in-process accumulation of rank 0's and rank 1's micro-batches
    (same images, noise and levels as each worker drew) gives the same rows and Adam moments."""
    assert parallel_run["code"] == 0, parallel_run["worker_logs"]
    save = parallel_run["save"]
    digests = []
    for rank, log in enumerate(parallel_run["worker_logs"]):
        lines = [line for line in log.splitlines() if f"rank {rank}/2: learned rows sha256" in line]
        assert len(lines) == 1, log[-3000:]
        digests.append(lines[0].split()[-1])
    final = load_embedding(os.path.join(save, "toy.safetensors"))
    assert digests[0] == digests[1] == rows_digest([final.clip_l, final.clip_g])

    # rank 0 alone wrote: one set of files, no rank-named copies, one loss row per step, nothing in the cwd
    assert sorted(os.listdir(parallel_run["root"])) == ["logs", "msrun.out", "out"]
    assert sorted(os.listdir(save)) == sorted([f"{MODEL_NAME}_2_ti.ckpt", "toy_2.safetensors", f"{MODEL_NAME}_ti.ckpt",
                                               "toy.safetensors", f"{MODEL_NAME}_best_ti.ckpt", "toy_best.safetensors",
                                               "loss.csv", "loss.png", "args.yaml", STATE_DIR, LOCK_FILE])
    assert [int(r[0]) for r in loss_rows(save)] == [0, 1, 2]
    assert "effective batch   : 2 = 1 per device x 1 accumulation x 2 device(s)" in parallel_run["worker_logs"][0]
    assert "effective batch" not in parallel_run["worker_logs"][1]
    # the validation loss, each rank evaluating half of the draws: at step 0 the same as run A's (the same draws and
    # initial rows, one process in batches of 2), and at the end
    val = [r[2] for r in loss_rows(save)]
    assert val[1] == "" and val[2] != ""
    assert abs(float(val[0]) - float(loss_rows(resume_runs["A"])[0][2])) <= 2e-6

    # the same two steps in process: micro-batch 0 = rank 0's shard and noise, 1 = rank 1's. Each is the same
    # batch-of-1 computation as on its rank, and halving is exact in binary floating point, so the averaged
    # gradient (g0 + g1) / 2 of the ranks equals g0 / 2 + g1 / 2 of the accumulation bit for bit.
    training = harness.training
    orders = [EpochOrder(NUM_IMAGES, 1, 42, rank, 2) for rank in range(2)]
    harness.reset()
    for step in range(2):
        pair = [micro_batch(training, rank, 2, (step, 0), orders[rank]) for rank in range(2)]
        assert not np.array_equal(pair[0][0].asnumpy(), pair[1][0].asnumpy())  # the ranks drew different images
        harness.step(pair, lr=learning_rate("constant", LR, step, 2))
    rows, exp_avg, exp_avg_sq = harness.state()
    harness.reset()
    state = read_state(save, 2)
    for i, name in enumerate(ROW_NAMES):
        np.testing.assert_array_equal(state[name].asnumpy(), rows[i])
        np.testing.assert_array_equal(state["exp_avg." + name].asnumpy(), exp_avg[i])
        np.testing.assert_array_equal(state["exp_avg_sq." + name].asnumpy(), exp_avg_sq[i])
    assert not np.array_equal(rows[0], harness.initial_rows()[0])


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_rows_that_turn_non_finite_stop_the_run_before_they_are_written(failure_runs):
    """The rows overflow at step 2: one error line, exit 1, and the files of step 1 are the last written (no
    embedding, state or loss row of step 2; no final embedding)."""
    save, out = failure_runs["diverged"], failure_runs["out_diverged"]
    assert failure_runs["code_diverged"] == 1, out
    assert "Traceback" not in out
    (error,) = error_lines(out)
    assert "at step 2 the learned embedding became NaN or infinite" in error and "--learning_rate" in error
    assert os.path.join(save, STATE_DIR, "step_00000001") in error and "--resume latest" in error
    assert sorted(os.listdir(save)) == sorted([f"{MODEL_NAME}_1_ti.ckpt", "toy_1.safetensors", "loss.csv",
                                               "loss.png", "args.yaml", STATE_DIR, LOCK_FILE])
    assert sorted(os.listdir(os.path.join(save, STATE_DIR))) == ["latest", "step_00000001"]
    assert [int(r[0]) for r in loss_rows(save)] == [1]
    embedding = load_embedding(os.path.join(save, "toy_1.safetensors"))  # finite: it loads
    assert np.array_equal(embedding.clip_l, state_rows(read_state(save, 1))[0])
    assert embedding.metadata["step"] == "1" and embedding.metadata["seed"] == "42"  # the training's facts
    assert embedding.metadata["trainer"].startswith("sdxl-ti-mindspore ")


def test_full_disk_at_a_save_stops_with_one_line_and_keeps_the_last_state(failure_runs):
    """ENOSPC while step 4's training state is written: one error line naming the last complete state for
    --resume, exit 1, no half-written state folder left, `latest` still on step 2."""
    save, out = failure_runs["disk_full"], failure_runs["out_disk_full"]
    assert failure_runs["code_disk_full"] == 1, out
    assert "Traceback" not in out
    (error,) = error_lines(out)
    assert f"No space left on device ({save})" in error
    assert f"the last complete training state is {os.path.join(save, STATE_DIR, 'step_00000002')}" in error
    assert "--resume latest" in error
    assert sorted(os.listdir(os.path.join(save, STATE_DIR))) == ["latest", "step_00000002"]
    with open(os.path.join(save, STATE_DIR, "latest")) as f:
        assert f.read().strip() == "step_00000002"
    read_train_state(os.path.join(save, STATE_DIR, "step_00000002"), {})  # whole and readable
    assert [int(r[0]) for r in loss_rows(save)] == [1, 2, 3, 4]


def test_an_export_whose_rows_are_not_reached_stops_the_run_and_keeps_the_previous_files(failure_runs):
    """After step 2's save the tokenizers split the placeholder (its rows are never looked up): the export at step 4
    fails the encoding check, so one error line naming the file and the last complete state, exit 1; step 2's
    embeddings stay as they were (they load, with step 2's rows) and nothing of step 4 is left, not even a
    temporary file."""
    save, out = failure_runs["not_reached"], failure_runs["out_not_reached"]
    assert failure_runs["code_not_reached"] == 1, out
    assert "Traceback" not in out
    (error,) = error_lines(out)
    assert f"{os.path.join(save, MODEL_NAME)}_4_ti.ckpt: the word <toy> does not change the encoding of 'a photo " \
           f"of <toy>' in clip_l and clip_g (relative change 0.0e+00 and 0.0e+00; its 2 tokens occur 0 and 0 " \
           f"times in the prompt's token ids): its learned rows are not reached; it was not saved" in error
    assert f"the last complete training state is {os.path.join(save, STATE_DIR, 'step_00000002')}" in error
    assert sorted(os.listdir(save)) == sorted([f"{MODEL_NAME}_2_ti.ckpt", "toy_2.safetensors", "loss.csv", "args.yaml",
                                               "loss.png", STATE_DIR, LOCK_FILE])
    rows = state_rows(read_state(save, 2))
    for name in (f"{MODEL_NAME}_2_ti.ckpt", "toy_2.safetensors"):
        embedding = load_embedding(os.path.join(save, name))
        assert embedding.metadata["step"] == "2"
        assert np.array_equal(embedding.clip_l, rows[0]) and np.array_equal(embedding.clip_g, rows[1])


def test_the_encoding_check_passes_a_reached_word_by_far_and_restores_the_rows(harness, monkeypatch):
    """The check every exported file passes (`EncodingCheck`): with the word's rows reached, "a photo of <toy>"
    encodes differently from "a photo of" by over 100 times `MIN_CHANGE` in both text encoders, whatever the rows
    hold (the initial ones, zeros); the training's own rows are back bit for bit after it. With tokenizers that
    split the word, the two encodings are the same."""
    training = harness.training
    check, own = training.encoding_check, training.rows()
    monkeypatch.setattr(encoding_check, "MIN_CHANGE", 100 * encoding_check.MIN_CHANGE)
    for rows in (harness.initial_rows(), [np.zeros_like(r) for r in harness.initial_rows()]):
        assert check(LearnedEmbedding("<toy>", *rows, source="test")) is None
        assert all(np.array_equal(a, b) for a, b in zip(training.rows(), own))
    embedders = training.model.conditioner.text_embedders()
    tokenizers = [e.tokenizer for e in embedders]
    try:
        for embedder, bare in zip(embedders, (vit_l_tokenizer(), bigg_tokenizer())):
            embedder.tokenizer = bare  # knows no placeholder: "<toy>" becomes ordinary pieces
        problem = check(LearnedEmbedding("<toy>", *harness.initial_rows(), source="test"))
    finally:
        for embedder, tokenizer in zip(embedders, tokenizers):
            embedder.tokenizer = tokenizer
    assert "(relative change 0.0e+00 and 0.0e+00; its 2 tokens occur 0 and 0 times in the prompt's token ids)" \
        in problem


@pytest.mark.parametrize("scheduler, change, changed", [
    ("constant", {"total_step": 20}, False),  # the false warning: 'constant' does not depend on the length
    ("constant", {"lr_warmup_steps": 2}, False),  # nor has it a warm-up
    ("constant", {"learning_rate": 1e-4}, True),
    ("constant", {"scale_lr": True}, True),  # times the effective batch, 2
    ("constant_with_warmup", {"total_step": 20}, False),
    ("constant_with_warmup", {"lr_warmup_steps": 2}, True),  # steps 1-3 warmed up over 4 steps, not 2
    ("linear", {"total_step": 20}, True),  # the rates of steps 1-3 depend on the length
    ("cosine", {"total_step": 20}, True),
    ("constant", {"learning_rate_clip_l": 5e-4}, False),  # the rate --learning_rate gave it anyway
    ("constant", {"learning_rate_clip_g": 1e-3}, True),
])
def test_resume_warns_only_when_past_learning_rates_change(scheduler, change, changed):
    """Resumed after 4 steps with other schedule flags: the run matches an uninterrupted one started with the
    new flags exactly when the 4 steps taken had the learning rates the new flags give them."""
    saved = {"lr_scheduler": scheduler, "learning_rate": 5e-4, "scale_lr": False,
             "lr_warmup_steps": 4 if scheduler == "constant_with_warmup" else 0, "total_step": 8}
    assert schedule_changed(saved, dict(saved, **change), 4, 2) is changed


def test_two_words_learn_their_own_rows(bucketing_run, harness):
    """--concept adds a second word with its own images, vectors and templates: the micro-batches take the words in
    turn (step 1 <toy>, step 2 <dot>), so at step 1 only <toy>'s rows have moved and <dot>'s are still "toy"'s row,
    bit for bit; at step 2 <dot>'s have moved too. Each word has its own embedding files."""
    save, out = bucketing_run["save"], bucketing_run["out"]
    assert bucketing_run["code"] == 0, out
    names = {f"{MODEL_NAME}_{word}{step}_ti.ckpt" for word in ("toy", "dot") for step in ("_1", "_2", "")}
    names |= {f"{word}{step}.safetensors" for word in ("toy", "dot") for step in ("_1", "_2", "")}
    assert names <= set(os.listdir(save)) and not os.path.exists(os.path.join(save, f"{MODEL_NAME}_ti.ckpt"))

    def rows(word, step):
        embedding = load_embedding(os.path.join(save, f"{MODEL_NAME}_{word}{step}_ti.ckpt"))
        assert embedding.token == f"<{word}>"
        assert load_embedding(os.path.join(save, f"{word}{step}.safetensors")).clip_g.tolist() == embedding.clip_g.tolist()
        return embedding.clip_l, embedding.clip_g

    toy_start = harness.initial_rows()  # 2 vectors, each the row of "toy"
    for found, start in zip(rows("dot", "_1"), toy_start):
        assert found.shape == (1, start.shape[1]) and np.array_equal(found, start[:1])  # no gradient yet
    for found, start in zip(rows("toy", "_1"), toy_start):
        assert (np.abs(found - start).max(1) > 0).all()
    for dot, toy, start in zip(rows("dot", ""), rows("toy", ""), toy_start):
        assert np.abs(dot - start[:1]).max() > 0 and np.abs(dot - toy[:1]).max() > 0

    assert f"images found      : 2 in {bucketing_run['dots']} for <dot>" in out
    assert "tokens added      : 3 to each text encoder (<toy>, <toy>_1, <dot>)" in out
    assert out.count("--textual_inversion_weight") == 2
    saved = OmegaConf.load(os.path.join(save, "args.yaml"))
    assert [(w.token, w.num_vectors, w.learnable_property) for w in saved.resolved.words] == [
        ("<toy>", 2, "object"), ("<dot>", 1, "style")]
    assert list(saved.resolved.validation_prompts) == ["a photo of <toy>", "a painting in the style of <dot>"]
    with open(os.path.join(save, "loss.csv")) as f:
        assert "clip_g_cos_<dot>" in f.readline()
