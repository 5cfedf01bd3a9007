"""MindSpore's compile cache, keyed so that it is safe to leave on: a command run a second time loads its compiled
graphs instead of compiling them again (the quick start's train graph: 28 s to compile, 2 s to load).

MindSpore 2.10's cache (`MS_COMPILER_CACHE_ENABLE`, `MS_COMPILER_CACHE_PATH`) knows graphs only by the order a
process compiles them: the n-th graph a process compiles is loaded from `compile_cache_<n>.mindir`, whatever graph
that file holds, and the only check is a hash of the Python sources. A command that compiles its graphs in another
order (another flag, other image sizes, a resumed run) would run the wrong graphs without a word (measured: NaN and
zeros). So each command run gets a folder of its own, named by a hash of everything that decides which graphs it
compiles and in which order (`folder_for`): the command, every argument, the config's text, the weight file, the
training images, the project's code and MindSpore's version. A folder is used by one process at a time (a lock),
and trusted only once a run has finished with it (`complete`); a folder a killed run left behind is emptied.

Each folder holds `key.json` (what it was made for, readable), the graphs (`rank_0/graph_cache/`) and a child
process's folder (`child_env`). Delete the cache root at any time; the next run compiles again. The cache is
set up once per process, before its first graph is compiled: the folder MindSpore uses cannot change after that
(graphs compiled while it is off do not count).
"""
import fcntl
import glob
import hashlib
import json
import os
import shutil

ROOT_ENV = "SDXL_TI_COMPILE_CACHE"  # the cache's root folder; default ~/.cache/sdxl-ti/compile_cache
ENABLE_ENV, PATH_ENV = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"  # MindSpore's switches
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPLETE = "complete"


class CompileCacheError(OSError):
    """The cache's folder cannot be used (the message says which and what to do)."""


def default_root():
    """$SDXL_TI_COMPILE_CACHE ("off" turns the cache off), else ~/.cache/sdxl-ti/compile_cache."""
    return os.environ.get(ROOT_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sdxl-ti", "compile_cache")


def add_compile_cache_argument(group):
    """--compile_cache, the same for every command that uses the cache."""
    group.add_argument("--compile_cache", default=default_root(),
                       help=f"folder of compiled graphs, so that a command run again with the same arguments, "
                            f"config, weights and images loads them instead of compiling (the log says which); off: "
                            f"compile every time. Safe to delete. (default: ${ROOT_ENV}, else %(default)s)")


def fingerprint(path):
    """What identifies a file or folder's content without reading it: path, size and modification time of each
    file (a folder's as one hash); None for None."""
    if path is None:
        return None
    if os.path.isdir(path):
        files = sorted(os.path.join(top, name) for top, _, names in os.walk(path) for name in names)
        return hashlib.sha256(json.dumps([fingerprint(f) for f in files]).encode()).hexdigest()
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def code_fingerprint(project_root=PROJECT_ROOT):
    """A hash of the project's Python sources (gm/, the commands, demo/, tools/): a changed line, a new graph."""
    files = sorted(glob.glob(os.path.join(project_root, "*.py"))
                   + glob.glob(os.path.join(project_root, "gm", "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(project_root, "demo", "*.py"))
                   + glob.glob(os.path.join(project_root, "tools", "*.py")))
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, project_root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def folder_for(root, command, facts):
    """(the folder under `root` of a run of `command` with `facts` (JSON-serialisable: arguments, fingerprints of
    files ...), its whole key as a dict): the facts, the code's fingerprint and MindSpore's version."""
    import mindspore as ms

    whole = {"command": command, "facts": facts, "code": code_fingerprint(), "mindspore": ms.__version__}
    digest = hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(os.path.abspath(root), f"{command}-{digest[:16]}"), whole


class CompileCache:
    """The compile-cache folder of this process. Use `open`; `None` from it means the cache is off."""

    def __init__(self, folder, lock):
        self.folder, self._lock = folder, lock
        self.reused = os.path.exists(os.path.join(folder, COMPLETE))

    @classmethod
    def open(cls, root, command, facts):
        """Set MindSpore's cache to the folder of (`command`, `facts`) under `root`, for this process and its
        children (`child_env`); `None` if another process is using that folder (this one then compiles without
        the cache). Call once, before this process compiles any graph (MindSpore settings from the shell are
        replaced)."""
        folder, whole = folder_for(root, command, facts)
        try:
            os.makedirs(folder, exist_ok=True)
            lock = open(os.path.join(folder, "lock"), "w")
        except OSError as e:
            raise CompileCacheError(f"--compile_cache {root}: cannot write there ({e.strerror}); give a folder you "
                                    f"can write to, or off") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            disable()
            return None
        if not os.path.exists(os.path.join(folder, COMPLETE)):  # new, or left by a run that did not finish
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name != "lock":
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            with open(os.path.join(folder, "key.json"), "w", encoding="utf-8") as f:
                json.dump(whole, f, indent=1, sort_keys=True, default=str)
        os.environ[ENABLE_ENV], os.environ[PATH_ENV] = "1", folder
        return cls(folder, lock)

    def describe(self):
        """The folder, and whether this run loads its graphs or compiles and saves them (for the commands' logs)."""
        what = ("the graphs of an earlier run with the same arguments, loaded, not compiled" if self.reused
                else "new: this run's graphs are compiled and saved there")
        return f"{self.folder} ({what})"

    def graphs(self):
        """How many graphs this process's folder holds (a child's not counted)."""
        return len(glob.glob(os.path.join(self.folder, "rank_*", "graph_cache", "compile_cache_*.mindir")))

    def mark_complete(self):
        """The run finished: its graphs may be loaded by the next run with the same key."""
        open(os.path.join(self.folder, COMPLETE), "w").close()

    def close(self):
        """Let another process use the folder (ending the process does too)."""
        self._lock.close()


def child_env(name, env):
    """`env` (this process's environment, or a copy of it) for a child process that compiles graphs of its own:
    with the cache on, the folder `name` inside this process's (its graphs are numbered from 0 again)."""
    if env.get(ENABLE_ENV) == "1" and env.get(PATH_ENV):
        return dict(env, **{PATH_ENV: os.path.join(env[PATH_ENV], name)})
    return env


def disable():
    """No compile cache for this process (nor, through the environment, its children), whatever the shell set."""
    os.environ[ENABLE_ENV] = "0"
    os.environ.pop(PATH_ENV, None)
