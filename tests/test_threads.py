"""Thread defaults of the `mmemb` command: OpenMP's passive wait policy and a thread count are set
before torch is imported, only where the user set nothing; `--threads`/MMEMB_THREADS beat the
recipe's train.threads, which beats OMP_NUM_THREADS; DeepSpeed's CPU notice is dropped."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mmemb import threads
from mmemb.cli import cli
from mmemb.errors import ConfigError
from mmemb.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")

# Runs the console entry point the way the `mmemb` script does, then reports what torch got.
PROBE = """\
import os, sys
from mmemb.cli import main
assert "torch" not in sys.modules, "the CLI module imported torch before priming"
sys.argv = ["mmemb", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
import torch
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"),
      torch.get_num_threads())
"""


def _probe(*args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MMEMB_THREADS")}
    result = subprocess.run([sys.executable, "-c", PROBE, *args], env={**clean, **env},
                            capture_output=True, text=True, timeout=300, check=True)
    return result.stdout.split()[-3:]


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    threads.use_cli_threads(None)
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def test_prime_sets_only_what_the_user_did_not() -> None:
    env: dict[str, str] = {}
    assert threads.prime_environment(env) == {
        "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads.available_cpus())}
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    user = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    assert threads.prime_environment(user) == {}
    assert user == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}


def test_entry_point_primes_before_torch_starts() -> None:
    assert _probe("plugins", "list") == [
        "PASSIVE", str(threads.available_cpus()), str(threads.available_cpus())]


def test_threads_option_and_env_var() -> None:
    assert _probe("--threads", "1", "plugins", "list") == ["PASSIVE", "1", "1"]
    assert _probe("plugins", "list", MMEMB_THREADS="1") == ["PASSIVE", "1", "1"]


def test_user_environment_is_kept() -> None:
    assert _probe("plugins", "list", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == [
        "ACTIVE", "1", "1"]


def test_bad_thread_count_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["--threads", "0", "plugins", "list"])
    assert result.exit_code == 2 and "--threads" in result.output


def test_command_line_beats_recipe(restore_threads: None) -> None:
    threads.use_cli_threads(None)
    threads.use_recipe_threads(1)
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    threads.use_cli_threads(2)
    threads.use_recipe_threads(1)
    assert torch.get_num_threads() == 2


def test_train_applies_train_threads(restore_threads: None) -> None:
    torch.set_num_threads(2)
    result = CliRunner().invoke(cli, ["train", QUICKSTART, "train.threads=1", "--help-recipe"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert "threads: 1" in result.output
    torch.set_num_threads(2)
    result = CliRunner().invoke(cli, ["--threads", "2", "train", QUICKSTART, "train.threads=1",
                                      "--help-recipe"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2


def test_train_threads_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"train\.threads: Input should be greater than 0"):
        load_recipe(QUICKSTART, ["train.threads=0"], check_components=False)


def test_deepspeed_cpu_notice_is_dropped_and_nothing_else() -> None:
    threads.prime_environment({"OMP_WAIT_POLICY": "x", "OMP_NUM_THREADS": "1"})
    logger = logging.getLogger("DeepSpeed")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    # A handler of our own on DeepSpeed's logger: the logger's filters run before any handler,
    # and caplog's root handler would depend on what earlier tests did to propagation.
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, "
                       "we were unable to detect it.")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["something else"]


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmemb_hf.tiny import make_tiny_llava_onevision

    from mmemb import plugins
    from mmemb.encoder_io import save_encoder
    from mmemb.model import Encoder

    tiny = make_tiny_llava_onevision(tmp_path_factory.mktemp("tiny"), weights=True, seed=0)
    encoder = Encoder(plugins.build("backbone", "llava_onevision", path=str(tiny)),
                      plugins.build("pooler", "last_token"))
    return save_encoder(encoder, tmp_path_factory.mktemp("enc") / "model",
                        backbone={"name": "llava_onevision", "path": str(tiny)},
                        pooler={"name": "last_token"})


def test_export_output_ends_with_the_result(saved_encoder: Path, tmp_path: Path) -> None:
    """No weight-loading/saving progress bars and no DeepSpeed accelerator notice (transformers
    imports DeepSpeed while saving): the last line says where the export went."""
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "mmemb", "--threads", "1", "export", "--model",
         str(saved_encoder), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    both = result.stdout + result.stderr
    for noise in ("Loading weights", "Writing model shards", "Setting accelerator", "it/s]"):
        assert noise not in both, both
    assert result.stdout.strip().splitlines()[-1].startswith("exported to"), both
