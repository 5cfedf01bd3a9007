"""The compile cache (`gm.compile_cache`): what decides a run's graphs keys its folder; the train step with every
update option saves and loads; a folder in use or left unfinished is never loaded from. (A training run again
loading its graphs and training bit for bit the same: `test_train_textual_inversion.py`, beside the run it repeats.)

MindSpore loads the n-th graph a process compiles from the n-th file whatever it holds, so the keying is what
keeps a stale or foreign graph from running."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gm import compile_cache
from gm.compile_cache import CompileCache, code_fingerprint, folder_for
from gm.models.loading import load_config
from train_textual_inversion import compile_cache_facts, parse_args, resolve_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_textual_inversion.py")
TINY = os.path.join(ROOT, "configs", "training", "sd_xl_tiny_textual_inversion.yaml")
DATA = os.path.join(ROOT, "datasets", "synthetic_toy")
ARGS = ["--config", TINY, "--data_path", DATA, "--placeholder_token", "<toy>", "--initializer_token", "star",
        "--device_target", "CPU", "--total_step", "3", "--validation_interval", "0"]


def facts(tmp_path, argv, config=TINY):
    args = parse_args(ARGS + ["--save_path", str(tmp_path / "run"), "--config", config, *argv])
    config = load_config(args.config)
    resolve_defaults(args, config)
    return compile_cache_facts(args, config, None)


def test_what_decides_the_graphs_keys_the_folder(tmp_path):
    """A changed config, argument, image or line of code gets a folder of its own; where the outputs go does not."""
    def folder(argv=(), config=TINY):
        return folder_for(tmp_path, "train", facts(tmp_path, list(argv), config))[0]

    changed_config = tmp_path / "changed.yaml"
    changed_config.write_text(open(TINY).read().replace("scale_factor: 0.13025", "scale_factor: 0.2"))
    assert changed_config.read_text() != open(TINY).read()
    data = tmp_path / "images"
    shutil.copytree(DATA, data)
    base = folder()
    assert folder() == base
    assert folder(["--save_path", str(tmp_path / "elsewhere"), "--overwrite"]) == base
    assert folder(config=str(changed_config)) != base
    assert folder(["--resolution", "128"]) != base
    copied = folder(["--data_path", str(data)])
    assert copied != base and folder(["--data_path", str(data)]) == copied  # the images are where they are
    os.remove(data / sorted(os.listdir(data))[0])
    assert folder(["--data_path", str(data)]) != copied  # one image fewer: other graphs' order, maybe other shapes

    project = tmp_path / "project"
    shutil.copytree(os.path.join(ROOT, "gm"), project / "gm")
    before = code_fingerprint(str(project))
    with open(project / "gm" / "util.py", "a") as f:
        f.write("\n# a changed line\n")
    assert code_fingerprint(str(project)) != before


TOY_STEP = """
import json, sys
import numpy as np
sys.path.insert(0, ROOT)
from gm.compile_cache import CompileCache
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from gm.textual_inversion.optim import AdamW
from gm.textual_inversion.train_step import TextualInversionTrainStep

ms.set_context(mode=ms.GRAPH_MODE)
options = json.loads(sys.argv[2])
cache = CompileCache.open(sys.argv[1], "toy", options)
rng = np.random.RandomState(0)


class ToyLoss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.frozen = Parameter(Tensor(rng.standard_normal((4, 3)), ms.float32), name="frozen", requires_grad=False)
        self.rows = Parameter(Tensor(rng.standard_normal((2, 4)), ms.float32), name="rows")

    def construct(self, x):
        return ((ops.matmul(self.rows, self.frozen) - x) ** 2).mean()


loss = ToyLoss()
norms = [np.linalg.norm(loss.rows.asnumpy(), axis=1)] if options["preserve_norm"] else None
accumulation = options["accumulation"]
step = TextualInversionTrainStep(loss, [loss.rows], AdamW([loss.rows]), accumulation_steps=accumulation,
                                 max_grad_norm=options["max_grad_norm"], row_norms=norms,
                                 dynamic_loss_scale=options["dynamic_loss_scale"])
losses = [float(step(Tensor(0.1, ms.float32), Tensor(i % accumulation == accumulation - 1),
                     Tensor(rng.standard_normal((2, 3)), ms.float32)).asnumpy()) for i in range(4)]
cache.mark_complete()
print(json.dumps({"reused": cache.reused, "losses": losses, "rows": loss.rows.asnumpy().tolist()}))
""".replace("ROOT", repr(ROOT))


@pytest.mark.parametrize("options", [
    {"accumulation": 1, "max_grad_norm": 0.0, "preserve_norm": False, "dynamic_loss_scale": False},
    {"accumulation": 2, "max_grad_norm": 1.0, "preserve_norm": True, "dynamic_loss_scale": True},
], ids=["plain", "every_option"])
def test_every_train_step_option_saves_and_loads(tmp_path, options):
    """The train step's update with each of its options (accumulation, clipping, --embedding_norm preserve, fp16's
    dynamic loss scale) on a toy loss: saved by the first run (a graph MindSpore cannot save stops the run), loaded
    by the second, the same losses and rows."""
    script = tmp_path / "toy_step.py"
    script.write_text(TOY_STEP)
    runs = []
    for _ in range(2):
        process = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), json.dumps(options)],
                                 capture_output=True, text=True, timeout=300)
        assert process.returncode == 0, process.stderr[-3000:]
        runs.append(json.loads(process.stdout.strip().splitlines()[-1]))
    assert [run["reused"] for run in runs] == [False, True]
    assert runs[1]["losses"] == runs[0]["losses"] and runs[1]["rows"] == runs[0]["rows"]
    assert np.isfinite(runs[0]["losses"]).all()


@pytest.fixture
def cache_env(monkeypatch):
    """Whatever a test sets of MindSpore's cache switches is undone after it (no graph is compiled meanwhile)."""
    monkeypatch.setenv(compile_cache.ENABLE_ENV, "0")
    monkeypatch.delenv(compile_cache.PATH_ENV, raising=False)


def test_a_folder_in_use_or_unfinished_is_not_loaded_from(tmp_path, cache_env):
    run_facts = {"args": ["a"]}
    cache = CompileCache.open(tmp_path, "train", run_facts)
    assert not cache.reused and os.environ[compile_cache.PATH_ENV] == cache.folder
    assert os.environ[compile_cache.ENABLE_ENV] == "1"
    assert CompileCache.open(tmp_path, "train", run_facts) is None  # in use: this process compiles without it
    assert os.environ[compile_cache.ENABLE_ENV] == "0" and compile_cache.PATH_ENV not in os.environ

    stale = os.path.join(cache.folder, "rank_0", "graph_cache", "compile_cache_0.mindir")
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").close()
    cache.close()  # the run ended without finishing: its graphs are not trusted
    again = CompileCache.open(tmp_path, "train", run_facts)
    assert again.folder == cache.folder and not again.reused and not os.path.exists(stale)
    assert os.path.exists(os.path.join(again.folder, "key.json"))
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").close()
    again.mark_complete()
    again.close()
    last = CompileCache.open(tmp_path, "train", run_facts)
    assert last.reused and os.path.exists(stale) and last.graphs() == 1
    child = compile_cache.child_env("latent_encoder", dict(os.environ))
    assert child[compile_cache.PATH_ENV] == os.path.join(last.folder, "latent_encoder")
    last.close()


def test_a_cache_folder_that_cannot_be_written_is_one_clear_error(tmp_path):
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    process = subprocess.run([sys.executable, SCRIPT, *ARGS, "--compile_cache", str(not_a_folder / "cache"),
                              "--save_path", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1].startswith(f"error: --compile_cache {not_a_folder / 'cache'}: "
                                                             "cannot write there")
    assert "Traceback" not in process.stderr


def test_the_sampling_commands_key_leaves_out_the_prompts_words_and_seeds(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "demo"))
    import sampling_without_streamlit as sampling

    embedding = tmp_path / "toy.safetensors"
    embedding.write_bytes(b"rows")
    base = ["--config", os.path.join(ROOT, "configs", "inference", "sd_xl_tiny.yaml"), "--H", "64", "--W", "64",
            "--prompt", "a photo of a red star", "--textual_inversion_weight", str(embedding)]

    def folder(argv=(), prompts=1):
        args = sampling.get_parser().parse_args(base + list(argv))
        return folder_for(tmp_path, "sample", sampling.compile_cache_facts(args, "the config", prompts))[0]

    same = folder()
    assert folder(["--prompt", "a photo of <toy>", "--seed", "7", "--save_path", str(tmp_path / "other")]) == same
    assert folder(["--task", "img2img", "--img", "a.png"]) != same  # the encoder's graph comes in
    assert folder(["--num_cols", "4"]) != same and folder(["--H", "128"]) != same and folder(prompts=2) != same
    embedding.write_bytes(b"other rows")
    assert folder() != same
