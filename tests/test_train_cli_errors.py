"""Bad input to train_textual_inversion.py, through the command line: each case gives one clear `error:` line
naming the flag or file, a non-zero exit, no traceback, and nothing written (neither in --save_path nor in the
working directory). A few cases run as the user runs them, in a process of their own (their exit code and all they
print); the rest through the command's own entry point (`cli`) in this process, which saves starting Python and
importing MindSpore anew for each."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from gm.models.loading import load_config
from gm.textual_inversion.checkpointing import RunFolderInUse, run_folder_lock
from train_textual_inversion import (
    UsageError, build_parser, check_args, cli, parse_args, parse_concept, resolve_defaults,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_textual_inversion.py")
TINY = os.path.join(ROOT, "configs", "training", "sd_xl_tiny_textual_inversion.yaml")
DATA = os.path.join(ROOT, "datasets", "synthetic_toy")
WEIGHTS = os.path.join(ROOT, "checkpoints", "sd_xl_tiny_shapes.safetensors")


def tiny(*extra, data=DATA, token="<toy>"):
    return ["--config", TINY, "--data_path", data, "--placeholder_token", token, "--device_target", "CPU", *extra]


# name -> (arguments, with {tmp} for the case's folder; words the error line must contain)
CASES = {
    "data_path_missing": (tiny(data="{tmp}/no_such_folder"), ["--data_path", "no_such_folder"]),
    "data_path_empty": (tiny(data="{tmp}/empty"), ["no images", "empty"]),
    "no_usable_image": (tiny(data="{tmp}/broken"), ["could be read", "broken"]),
    "placeholder_in_vocabulary": (tiny(token="cat"), ["'cat'", "already in the vocabulary"]),
    "initializer_without_a_word": (tiny("--initializer_token", " "), ["--initializer_token ' '", "no word"]),
    "num_vectors_0": (tiny("--num_vectors", "0"), ["--num_vectors must be at least 1"]),
    "total_step_0": (tiny("--total_step", "0"), ["--total_step must be at least 1"]),
    "accumulation_0": (tiny("--gradient_accumulation_steps", "0"), ["--gradient_accumulation_steps must be at least 1"]),
    "batch_size_0": (tiny("--train_batch_size", "0"), ["--train_batch_size must be at least 1"]),
    "resolution_100": (tiny("--resolution", "100"), ["--resolution 100", "multiples of 32"]),
    # buckets are multiples of 32 too, so --bucketing takes every --resolution the square does, and no other
    "bucketing_resolution_48": (tiny("--bucketing", "True", "--resolution", "48"), ["--resolution 48", "from 64 up"]),
    "bf16_on_cpu": (tiny("--precision", "bf16"), ["--precision bf16", "CPU"]),
    "another_run_in_save_path": (tiny(), ["--save_path", "another run", "--resume latest", "--overwrite"]),
    # the test holds the run folder's lock meanwhile, as a training running there does
    "save_path_in_use": (tiny(), ["--save_path", "in use by another training", f"process {os.getpid()}"]),
    "save_path_under_a_file": (tiny("--save_path", "{tmp}/a_file/run"),
                               ["--save_path", "a_file is a file, not a folder"]),
    "snr_gamma_negative": (tiny("--snr_gamma", "-5"), ["--snr_gamma must be positive", "got -5.0"]),
    "noise_offset_negative": (tiny("--noise_offset", "-0.1"), ["--noise_offset must not be negative, got -0.1"]),
    "train_encoders_bad": (tiny("--train_encoders", "l,x"), ["--train_encoders must be l,g", "'l,x'"]),
    "caption_dropout_over_1": (tiny("--caption_dropout", "1.5"), ["--caption_dropout must be between 0 and 1, got 1.5"]),
    "keep_tokens_negative": (tiny("--keep_tokens", "-1"), ["--keep_tokens must not be negative, got -1"]),
    "learning_rate_clip_l_0": (tiny("--learning_rate_clip_l", "0"), ["--learning_rate_clip_l must be positive, got 0.0"]),
    "learning_rate_clip_g_negative": (tiny("--learning_rate_clip_g", "-0.0001"),
                                      ["--learning_rate_clip_g must be positive, got -0.0001"]),
    "learning_rate_nan": (tiny("--learning_rate", "nan"), ["--learning_rate must be a finite number, got nan"]),
    "placeholder_without_data_path": (["--config", TINY, "--placeholder_token", "<toy>", "--device_target", "CPU"],
                                      ["--placeholder_token and --data_path go together", "--concept"]),
    "concept_without_folder": (tiny("--concept", "<dot>"), ["--concept '<dot>'", "expected TOKEN:DATA_PATH"]),
    "concept_folder_missing": (tiny("--concept", "<dot>:{tmp}/nowhere:2"), ["--concept '<dot>:", "nowhere: no such"]),
    "concept_vectors_0": (tiny("--concept", "<dot>:{tmp}/empty:0"), ["--concept '<dot>:", "at least 1, got 0"]),
    "two_words_one_token": (tiny("--concept", "<TOY>:{tmp}/empty"),
                            ["--concept '<TOY>:", "'<TOY>' is already a token of the word '<toy>'"]),
    "word_named_like_a_vector": (tiny("--num_vectors", "2", "--concept", "<toy>_1:{tmp}/empty"),
                                 ["'<toy>_1' is already a token of the word '<toy>'"]),
    "word_named_like_a_step": (tiny("--concept", "<toy_4>:{tmp}/empty"),
                               ["--concept '<toy_4>:", "toy_4.safetensors", "clash with those of the word '<toy>'"]),
    "word_named_like_the_best": (tiny("--concept", "<toy_best>:{tmp}/empty"),
                                 ["--concept '<toy_best>:", "toy_best.safetensors", "clash with those of the word"]),
    "validation_interval_negative": (tiny("--validation_interval", "-1"),
                                     ["--validation_interval must be at least 0 (0: off), got -1"]),
    "validation_draws_0": (tiny("--validation_draws", "0"), ["--validation_draws must be at least 1, got 0"]),
    "weights_given_as_config": (
        ["--config", WEIGHTS, "--data_path", DATA, "--placeholder_token", "<toy>", "--device_target", "CPU"],
        ["sd_xl_tiny_shapes.safetensors", "a binary file, not a YAML config"]),
    "resume_without_state": (tiny("--resume", "latest"), ["--resume latest", "no training state"]),
    "resume_not_a_state": (tiny("--resume", "{tmp}/empty"), ["--resume", "not a training state"]),
    "full_config_without_weights": (
        ["--data_path", DATA, "--placeholder_token", "<toy>", "--device_target", "CPU"],
        ["weights not found", "checkpoints/sd_xl_base_1.0_ms.ckpt", "huggingface.co"]),
    "weight_file_missing": (
        ["--data_path", DATA, "--placeholder_token", "<toy>", "--weight", "{tmp}/sd_xl_base_1.0.safetensors"],
        ["weights not found", "sd_xl_base_1.0.safetensors"]),
    # the seed's two example commands (mindone's textual-inversion README), on the full config by default
    "seed_cat_toy_command": (
        ["--data_path", "datasets/cat_toy", "--save_path", "runs/cat_toy", "--infer_during_train", "True",
         "--gradient_accumulation_steps", "4", "--num_vectors", "10", "--total_step", "3000",
         "--placeholder_token", "<cat-toy>", "--learnable_property", "object"],
        ["weights not found", "checkpoints/sd_xl_base_1.0_ms.ckpt"]),
    "seed_chinese_art_command": (
        ["--data_path", "datasets/chinese_art", "--save_path", "runs/chinese_art", "--infer_during_train", "True",
         "--gradient_accumulation_steps", "4", "--num_vectors", "2", "--total_step", "2000",
         "--placeholder_token", "<chinese-art>", "--learnable_property", "style"],
        ["weights not found", "checkpoints/sd_xl_base_1.0_ms.ckpt"]),
}
# the cases given a --save_path of their own: it must not exist afterwards (or be unchanged, for the one
# holding another run)
OWN_SAVE_PATH = [name for name, (argv, _) in CASES.items() if "--save_path" not in argv]


def prepare(case_dir):
    """The case's working directory: the repo's configs (for the default config path) and, like a user's
    checkout, the seed's datasets folders (copies of the synthetic one), but no checkpoints/."""
    os.makedirs(os.path.join(case_dir, "empty"))
    broken = os.path.join(case_dir, "broken")
    os.makedirs(broken)
    with open(os.path.join(broken, "a.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    with open(os.path.join(broken, "notes.md"), "w") as f:
        f.write("not an image")
    with open(os.path.join(case_dir, "a_file"), "w") as f:
        f.write("a file where a folder is expected")
    os.symlink(os.path.join(ROOT, "configs"), os.path.join(case_dir, "configs"))
    os.makedirs(os.path.join(case_dir, "datasets"))
    for name in ("cat_toy", "chinese_art"):
        os.symlink(DATA, os.path.join(case_dir, "datasets", name))
    save = os.path.join(case_dir, "out")
    if os.path.basename(case_dir) == "another_run_in_save_path":
        os.makedirs(os.path.join(save, "train_state"))
        for name in ("loss.csv", "args.yaml"):
            with open(os.path.join(save, name), "w") as f:
                f.write("from an earlier run\n")
    return save


def snapshot(folder):
    """{relative path: (size, mtime)} of everything under `folder`."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            stat = os.lstat(path)
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


# the cases run as separate processes: a flag error, a data error with its warning, and the seed's own command
IN_A_PROCESS = ("data_path_missing", "no_usable_image", "seed_cat_toy_command")


def in_this_process(argv):
    """(exit code, stdout, stderr) of `cli(argv)`, warnings printed to stderr as Python prints them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = cli(argv)
        except SystemExit as e:  # argparse's exit on a malformed flag
            code = e.code
    for w in caught:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case: {name: (returncode, stdout, stderr, files before, files after)}. The separate processes
    run meanwhile, in threads."""
    root = tmp_path_factory.mktemp("bad_input")

    def run(name):
        case_dir = str(root / name)
        os.makedirs(case_dir)
        save = prepare(case_dir)
        argv, _ = CASES[name]
        argv = [a.replace("{tmp}", case_dir) for a in argv]
        if name in OWN_SAVE_PATH:
            argv += ["--save_path", save]
        with run_folder_lock(save) if name == "save_path_in_use" else contextlib.nullcontext():
            before = snapshot(case_dir)
            if name in IN_A_PROCESS:
                proc = subprocess.run([sys.executable, SCRIPT, *argv], cwd=case_dir, capture_output=True, text=True,
                                      timeout=300)
                ran = proc.returncode, proc.stdout, proc.stderr
            else:
                with contextlib.chdir(case_dir):
                    ran = in_this_process(argv)
            return name, (*ran, before, snapshot(case_dir))

    with ThreadPoolExecutor(max_workers=len(IN_A_PROCESS)) as pool:
        separate = pool.map(run, IN_A_PROCESS)
        found = dict(run(name) for name in CASES if name not in IN_A_PROCESS)
        found.update(separate)
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly(results, name):
    returncode, stdout, stderr, before, after = results[name]
    _, words = CASES[name]
    assert returncode != 0, stdout + stderr
    assert "Traceback" not in stderr + stdout, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert after == before, "files were written or changed: " + str(set(after.items()) ^ set(before.items()))


@pytest.mark.parametrize("name", ["initializer_without_a_word", "snr_gamma_negative", "noise_offset_negative",
                                  "train_encoders_bad", "learning_rate_clip_l_0", "learning_rate_clip_g_negative",
                                  "caption_dropout_over_1", "keep_tokens_negative", "validation_interval_negative",
                                  "validation_draws_0"])
def test_bad_option_values_exit_2(results, name):
    assert results[name][0] == 2, results[name][2]


@pytest.mark.parametrize("text, expected", [
    ("<dog>:photos/dog", ("<dog>", "photos/dog", 1, "object")),
    ("<dog>:photos/dog:4", ("<dog>", "photos/dog", 4, "object")),
    ("<ink>:art:2:style", ("<ink>", "art", 2, "style")),
    ("<ink>:/mnt/a:b/art:3:face", ("<ink>", "/mnt/a:b/art", 3, "face")),  # a path may hold colons
    ("<ink>:style", ("<ink>", "style", 1, "object")),  # a folder named like a property is a folder
])
def test_concept_flag_parts(text, expected):
    """--concept TOKEN:DATA_PATH[:NUM_VECTORS[:PROPERTY]], the last two defaulting to --num_vectors and
    --learnable_property."""
    assert tuple(parse_concept(text, 1, "object"))[:4] == expected


def test_unreadable_image_is_named_in_a_warning(results):
    _, _, stderr, _, _ = results["no_usable_image"]
    assert "skipping unreadable image" in stderr and "a.png" in stderr


def test_help_explains_every_flag():
    from train_textual_inversion import build_parser

    flags = [action for action in build_parser()._actions if action.dest != "help"]
    assert len(flags) > 30
    for action in flags:
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help text"
    shown = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    for action in flags:
        assert action.option_strings[0] in shown.stdout


FLOAT_FLAGS = [action.dest for action in build_parser()._actions if action.type is float]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_every_float_flag_must_be_finite(tmp_path, flag, value):
    """NaN passes every range check (`nan <= 0` is False): each float flag is checked for finiteness first."""
    assert {"learning_rate", "flip_p", "max_grad_norm", "adam_weight_decay"} <= set(FLOAT_FLAGS)
    args = parse_args(tiny(f"--{flag}={value}", "--save_path", str(tmp_path / "run")))
    resolve_defaults(args, load_config(args.config))
    with pytest.raises(UsageError, match=f"--{flag} must be a finite number, got {value}"):
        check_args(args)


def test_read_only_save_path_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only file system: access(2) answers EROFS for writing, even to root (tests run as root, who may
    write in a chmod-ed folder; so access(2) is made to answer as a read-only mount would)."""
    read_only = str(tmp_path / "read_only_mount")
    os.makedirs(read_only)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (path == read_only and mode & os.W_OK)
                        and real_access(path, mode))
    args = parse_args(tiny("--save_path", os.path.join(read_only, "runs", "toy")))
    resolve_defaults(args, load_config(args.config))
    with pytest.raises(UsageError, match="--save_path .*: cannot write in .*read_only_mount .*read-only"):
        check_args(args)
    assert os.listdir(read_only) == []


LOCK_HOLDER = """
import sys, time
from gm.textual_inversion.checkpointing import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_run_folder_lock_lasts_as_long_as_its_process(tmp_path):
    """Another process holding the lock: refused at once, naming that process; killed (-9, no clean-up runs),
    its lock is gone with it."""
    folder = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, folder], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderInUse, match=f"in use by another training \\(process {holder.pid}\\)"):
            with run_folder_lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_folder_lock(folder):
        with pytest.raises(RunFolderInUse):  # exclusive within one process too (each open file is its own)
            with run_folder_lock(folder):
                pass


def test_an_export_that_does_not_read_back_stops_the_run(tmp_path):
    """The trainer's saves run under `stop_on_write_error`: an embedding file refused by its read-back check
    becomes one `error:` line (TrainingStopped, exit 1) that says what was kept."""
    import train_textual_inversion as trainer
    from gm.textual_inversion.embedding_io import EmbeddingFormatError

    with pytest.raises(trainer.TrainingStopped, match=r"does not read back as written.*The run stopped; no training "
                                                      r"state was saved"):
        with trainer.stop_on_write_error(str(tmp_path)):
            raise EmbeddingFormatError("toy_4.safetensors: the file written does not read back as written (...)")
