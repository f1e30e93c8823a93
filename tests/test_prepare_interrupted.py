"""An interrupted prepare never blocks the rerun of the same command.

Real processes, real signals: `mmemb prepare` (and the automatic prepare at the start of
`mmemb train`) is started as a subprocess, signalled once it has written its first shard into
OUT.partial, and the same command is run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmemb.data.prepare import prepare
from mmemb.data.shards import read_manifest
from mmemb.errors import DataError

# Big images make each row slow enough (tens of ms) to be caught mid-prepare, and few enough
# rows keep the rerun short.
SLOW = ["--arg", "n=60", "--arg", "image_size=512", "--shard-size", "5"]


def _cli(out: Path) -> list[str]:
    return ["prepare", "--source", "synthetic", *SLOW, "--out", str(out)]


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from mmemb.cli import main; main()", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_mid_prepare(proc: subprocess.Popen[str], staging: Path, timeout: float = 180) -> None:
    """Until the process has written a shard into its staging directory (and is still going)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"prepare ended (rc {proc.returncode}) before the signal:\n{out}{err}")
        if staging.is_dir() and any(p.suffix == ".tar" for p in staging.iterdir()):
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no shard appeared in {staging} within {timeout}s")


def _leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p != out)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signalled_prepare_cleans_up_and_the_same_command_reruns(
    tmp_path: Path, signum: int, code: int
) -> None:
    from mmemb.cli import cli

    out = tmp_path / "data" / "train"
    proc = _start(_cli(out), tmp_path)
    _wait_mid_prepare(proc, out.with_name("train.partial"))
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert "Run the same command again to redo it: mmemb prepare --source synthetic" in stderr
    assert not out.exists() and _leftovers(out.parent, out) == []  # no .partial, no claim dir

    result = CliRunner().invoke(cli, _cli(out))  # the same command, again
    assert result.exit_code == 0, result.output
    assert "read 60 = written 60 + rejected 0" in result.output
    assert read_manifest(out)["samples"] == 60


def test_a_killed_prepare_does_not_block_the_rerun(tmp_path: Path) -> None:
    from mmemb.cli import cli

    out = tmp_path / "train"
    proc = _start(_cli(out), tmp_path)
    _wait_mid_prepare(proc, tmp_path / "train.partial")
    proc.kill()  # SIGKILL: no handler runs, OUT.partial stays
    proc.communicate(timeout=60)
    assert (tmp_path / "train.partial").is_dir() and not out.exists()

    result = CliRunner().invoke(cli, _cli(out))
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(
        f"removed {tmp_path / 'train.partial'}, left by an interrupted prepare (pid {proc.pid} on "
    )
    assert lines[-1].startswith("read 60 = written 60 + rejected 0")
    assert _leftovers(tmp_path, out) == []


def test_a_running_prepare_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "train"
    staging = tmp_path / "train.partial"
    proc = _start(_cli(out), tmp_path)
    try:
        _wait_mid_prepare(proc, staging)
        for overwrite in (False, True):  # not even --overwrite takes it from a live writer
            with pytest.raises(DataError, match=rf"another prepare into .* is running now "
                                                rf"\(pid {proc.pid} on "):
                prepare("synthetic", {"n": 3}, out, overwrite=overwrite)
        assert staging.is_dir() and proc.poll() is None
        owner = json.loads((staging / ".prepare-owner.json").read_text())
        assert owner["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 75 and not staging.exists()


def test_the_automatic_prepare_of_train_recovers_after_sigterm(tmp_path: Path) -> None:
    from mmemb.distributed import dist_env
    from mmemb.recipe import load_recipe
    from mmemb.train.data import ensure_prepared

    shards = tmp_path / "data" / "quickstart" / "train"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "output_dir: runs/x\n"
        "data:\n"
        "  train:\n"
        f"    - {{shards: {shards}, source: synthetic, args: {{n: 60, image_size: 512}}}}\n"
        "model: {backbone: {name: anything}}\n"
        "train: {steps: 1, batch_size: 2}\n"
    )
    # what `mmemb train` runs first, with the signal handling it has before training starts
    code = (
        "import sys\n"
        "from mmemb.distributed import dist_env\n"
        "from mmemb.recipe import load_recipe\n"
        "from mmemb.train.data import ensure_prepared\n"
        "ensure_prepared(load_recipe(sys.argv[1], check_components=False), dist_env())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-c", code, str(recipe)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_mid_prepare(proc, shards.with_name("train.partial"))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and not shards.exists()
    left = shards.with_name("train.partial").exists()  # yes while train has no SIGTERM handler

    said: list[str] = []
    ensure_prepared(load_recipe(str(recipe), check_components=False), dist_env(),
                    echo=said.append)  # the requeued run
    assert read_manifest(shards)["samples"] == 60
    assert not shards.with_name("train.partial").exists()
    assert any(line.startswith("read 60 = written 60") for s in said for line in s.splitlines())
    assert any("left by an interrupted prepare" in s for s in said) == left


def test_a_stop_while_the_output_is_published_finishes_the_prepare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal lands between the finished shards and their move into place: the prepare is
    done, so the command succeeds (a requeue status would make the rerun refuse its own output)."""
    import mmemb.data.prepare as prepare_module
    from mmemb.cli import cli

    real_publish = prepare_module._publish

    def publish_under_a_signal(staging: Path, out: Path) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once: held, not raised
        real_publish(staging, out)

    monkeypatch.setattr(prepare_module, "_publish", publish_under_a_signal)
    out = tmp_path / "train"
    result = CliRunner().invoke(cli, ["prepare", "--source", "synthetic", "--arg", "n=4",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "SIGTERM arrived while the finished output was moved into" in result.output
    assert read_manifest(out)["written"] == 4
    assert _leftovers(tmp_path, out) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were restored
