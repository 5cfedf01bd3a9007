"""What a training run writes, and reads back to resume.

Under `--save_path`:
- `SD-XL-base-1.0_<step>_ti.ckpt` and `<name>_<step>.safetensors`: the learned rows at a step (our MindSpore
  checkpoint, and the SDXL community format {"clip_l", "clip_g"}); at the end the same without `_<step>`; with
  `_best` instead of `_<step>`, the rows of the lowest validation loss (never pruned by `max_num_ckpt`); a run
  that learns several words writes `SD-XL-base-1.0_<name>_<step>_ti.ckpt` and `<name>_<step>.safetensors` per word;
- `train_state/step_<step>/`: everything needed to continue exactly (learned rows, optimizer moments, loss
  scale, step and data order, the validation draws and best rows; the noise is a function of seed and step), and
  `train_state/latest`, naming the newest complete one.

Every file is written under a temporary name and renamed, and `latest` moves only after a state folder is
complete, so a run killed at any moment leaves its last checkpoint loadable; a write that fails (a full disk)
removes its temporary files. A training holds `.lock` in its run folder for its lifetime, so that a second one
on the same folder refuses to start.
"""
import contextlib
import fcntl
import glob
import json
import os
import re
import shutil

import mindspore as ms
from mindspore import ops

from gm.textual_inversion.embedding_io import save_embedding
from gm.util import atomic_write

MODEL_NAME = "SD-XL-base-1.0"
STATE_DIR = "train_state"
STATE_KEEP = 2  # newest complete training states kept; older ones are pruned
LOCK_FILE = ".lock"


class ResumeError(ValueError):
    """A training state that cannot be resumed from; the message says why."""


class RunFolderInUse(ValueError):
    """Another training holds the run folder."""


@contextlib.contextmanager
def run_folder_lock(save_path):
    """Hold an exclusive lock on the run folder `save_path` (created if needed) for the `with` block; raise
    RunFolderInUse at once if another process holds it. The kernel drops a flock when its process ends, so a
    crashed run leaves no stale lock. A run that fails before writing anything leaves no folder behind."""
    created = not os.path.isdir(save_path)
    fd = _acquire_lock(os.path.join(save_path, LOCK_FILE))
    try:
        yield
    except BaseException:
        if created and os.listdir(save_path) == [LOCK_FILE]:
            os.remove(os.path.join(save_path, LOCK_FILE))  # while still locked: a newcomer retries on a fresh file
            os.rmdir(save_path)
        raise
    finally:
        os.close(fd)


def _acquire_lock(path):
    """An open descriptor of `path` holding its flock. Retried when the file was removed or replaced between
    opening and locking (a failed run cleaning up), so the lock is always on the file the path names."""
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder went away meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderInUse(f"--save_path {os.path.dirname(path)} is in use by another training (process "
                                 f"{owner or '?'}); wait for it to end, or choose another --save_path.") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the message above
            return fd
        os.close(fd)


def embedding_name(token):
    """A file-name-safe name for a placeholder: "<cat-toy>" -> "cat-toy"."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", token).strip("._-")
    return name or "embedding"


def embedding_paths(save_path, token, step=None, several_words=False):
    """(our .ckpt, community .safetensors) paths for `step` (a step number, or "best"), or the final ones when step
    is None; in a run that learns several words, each word's .ckpt is named after it too."""
    suffix = "" if step is None else f"_{step}"
    return (os.path.join(save_path, f"{_ckpt_prefix(token, several_words)}{suffix}_ti.ckpt"),
            os.path.join(save_path, f"{embedding_name(token)}{suffix}.safetensors"))


def save_learned_embeddings(save_path, token, rows_l, rows_g, step=None, max_num_ckpt=None, metadata=None,
                            several_words=False, verify=None):
    """Write the learned rows of `token` in both formats (each read back, and checked by `verify`, before it
    replaces anything), with `metadata` (the training's facts); keep at most `max_num_ckpt` step-numbered pairs of
    this word."""
    paths = embedding_paths(save_path, token, step, several_words)
    for path in paths:
        save_embedding(path, rows_l, rows_g, token, metadata=metadata, verify=verify)
    if step is not None and max_num_ckpt:
        steps = sorted(_numbered_steps(save_path, token, several_words))
        for old in steps[:-max_num_ckpt]:
            for path in embedding_paths(save_path, token, old, several_words):
                if os.path.exists(path):
                    os.remove(path)
    return paths


def _ckpt_prefix(token, several_words):
    return f"{MODEL_NAME}_{embedding_name(token)}" if several_words else MODEL_NAME


def _numbered_steps(save_path, token, several_words):
    """The steps of `token`'s step-numbered .ckpt files in `save_path`."""
    pattern = re.compile(re.escape(_ckpt_prefix(token, several_words)) + r"_(\d+)_ti\.ckpt$")
    for name in os.listdir(save_path):
        match = pattern.match(name)
        if match:
            yield int(match.group(1))


# ---------------------------------------------------------------------------------------------- train state


def save_train_state(save_path, step, parameters, host_state):
    """Write `parameters` (MindSpore Parameters: learned rows and optimizer state) and `host_state` (JSON:
    step, data order, run identity) as `train_state/step_<step>/`, then point `latest` at it."""
    root = os.path.join(save_path, STATE_DIR)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        ms.save_checkpoint([{"name": p.name, "data": ms.Tensor(p.asnumpy())} for p in parameters],
                           os.path.join(tmp, "state.ckpt"))
        with open(os.path.join(tmp, "host_state.json"), "w") as f:
            json.dump(dict(host_state, step=step), f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not leave half a state behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(os.path.join(root, "latest"), lambda p: _write_text(p, os.path.basename(final)), ".txt")
    for old in sorted(glob.glob(os.path.join(root, "step_*[0-9]")))[:-STATE_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def find_train_state(save_path, resume):
    """The state folder `--resume` names: "latest" (under save_path), a state folder, or a run folder (or its
    train_state/) whose latest state is meant."""
    if resume == "latest":
        state = latest_train_state(save_path)
        if state is None:
            raise ResumeError(f"--resume latest: no training state in {save_path} (no {STATE_DIR}/latest).")
        return state
    if os.path.isfile(os.path.join(resume, "host_state.json")):
        return resume
    for root in (os.path.join(resume, STATE_DIR), resume):
        if os.path.isfile(os.path.join(root, "latest")):
            return _latest(root)
    raise ResumeError(f"--resume {resume}: not a training state (expected a run folder, or its {STATE_DIR}/step_<n>/ "
                      "holding host_state.json and state.ckpt).")


def _latest(root):
    with open(os.path.join(root, "latest")) as f:
        return os.path.join(root, f.read().strip())


def latest_train_state(save_path):
    """The newest complete training state under `save_path`, or None."""
    root = os.path.join(save_path, STATE_DIR)
    return _latest(root) if os.path.isfile(os.path.join(root, "latest")) else None


def read_train_state(state_dir, identity):
    """The host state of `state_dir` after checking it belongs to a run like this one (`identity`: placeholder,
    vectors, model, ...). Cheap: call it before building anything, to fail fast."""
    try:
        with open(os.path.join(state_dir, "host_state.json")) as f:
            host_state = json.load(f)
        saved_identity = host_state["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{state_dir}: training state unreadable ({type(e).__name__}: {e}).") from None
    differences = [f"{key}: saved {saved_identity.get(key)!r}, now {value!r}"
                   for key, value in identity.items() if saved_identity.get(key) != value]
    if differences:
        raise ResumeError(f"{state_dir} is from a different run and cannot be resumed:\n  " + "\n  ".join(differences))
    return host_state


def load_train_state(state_dir, parameters):
    """Copy the saved values into `parameters` (learned rows and optimizer state), checking names and shapes."""
    try:
        saved = ms.load_checkpoint(os.path.join(state_dir, "state.ckpt"))
    except (OSError, ValueError, RuntimeError) as e:
        raise ResumeError(f"{state_dir}: training state unreadable ({str(e).splitlines()[0]}).") from None
    for param in parameters:
        if param.name not in saved or tuple(saved[param.name].shape) != tuple(param.shape):
            raise ResumeError(f"{state_dir}: state.ckpt lacks {param.name} {tuple(param.shape)}.")
    for param in parameters:
        # in place: after a graph that updates `param` is compiled, set_data would give it a buffer the graph
        # no longer uses (MindSpore 2.10), so a state loaded then would be silently ignored
        ops.assign(param, ms.Tensor(saved[param.name].asnumpy(), param.dtype))
