"""README.md and docs/: every figure of the results table is in the file it links to, every
relative link resolves, and every command in a code block parses as its program parses it.

Commands are read from the ```bash blocks and the tables (inline code) of README.md and docs/*.md,
and from the first comment lines of the config files (``# python train.py ...``). Each kind is checked without running it:

- ``python train.py``, ``bincount-train``, ``torchrun ... train.py``, ``python eval.py``,
  ``bincount-eval``: Hydra composes the overrides (the first value of a sweep), and the data,
  model and, on a CPU, trainer configs instantiate;
- ``python -m sagemaker_launch.<module>``: ``--help`` exits 0 and the module's own argument
  parsing and composition accept the line (``launch`` also plans the job, ``tune`` reads the
  search space);
- ``bincount <command> ...``: ``--help`` of the (sub)command exits 0 and its parser accepts the line;
- ``mlflow <command> ...``: ``--help`` of the command exits 0 and names every ``--option`` of the line;
- ``python benchmarks/<script>.py``: ``--help`` exits 0 after the line's arguments, and every
  ``--option`` of the line is in that help;
- ``python -m pytest -m EXPR``: every marker of EXPR is declared in pyproject.toml.

A ```text block quotes a result file (the last `.txt` linked before it) line for line.

A command of any other kind fails the test unless it is an installation step (:data:`NOT_CHECKED`),
so a new kind of command cannot go unchecked.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import hydra
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from bincount.config import compose
from tests.fakes import set_output_dir

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
# installation and shell steps: nothing of the project's to parse
NOT_CHECKED = {("pip",), ("uv", "pip"), ("python3", "-m", "venv"), (".",)}
SHELL_BLOCKS = {"bash", "sh", "shell"}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------- the results table


def results_table(text: str) -> list[list[str]]:
    """The body rows of the first table under ``## Results``, as lists of cells."""
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) > 2, "no table under ## Results"
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


FIGURE_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")  # [0.881](benchmarks/results/...)
FIGURE_REF = re.compile(r"(?<!!)\[([^\]]+)\]\[([^\]]+)\]")  # [0.881][quickstart]
REFERENCE = re.compile(r"^\[([^\]]+)\]:\s*(\S+)", flags=re.M)  # [quickstart]: benchmarks/results/...
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def cell_links(cell: str, references: dict[str, str]) -> list[tuple[str, str]]:
    """``(text, target)`` of the inline and reference-style links of a table cell."""
    found = FIGURE_LINK.findall(cell)
    for text, name in FIGURE_REF.findall(cell):
        found.append((text, references.get(name, f"(no line [{name}]: <path> in README.md)")))
    return found


def json_numbers(doc) -> list[float]:
    """Every number (not a boolean) anywhere in a parsed JSON document."""
    if isinstance(doc, bool):
        return []
    if isinstance(doc, (int, float)):
        return [doc] if math.isfinite(doc) else []
    if isinstance(doc, dict):
        return [n for v in doc.values() for n in json_numbers(v)]
    if isinstance(doc, list):
        return [n for v in doc for n in json_numbers(v)]
    return []


def figure_in_file(figure: str, path: Path) -> bool:
    """Whether ``figure`` (as the README writes it) is in the result file ``path``.

    JSON (``.json``, ``.jsonl``): every number of the figure is a value of the file rounded to the
    figure's decimals (``1.42`` matches 1.4219...). Any other file: the figure appears as written.
    """
    figure = figure.strip().rstrip("x×").strip()
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        docs = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else [json.loads(text)]
        values = [n for doc in docs for n in json_numbers(doc)]
        tokens = NUMBER.findall(figure)
        return bool(tokens) and all(
            any(f"{v:.{len(t.partition('.')[2])}f}" == t for v in values) for t in tokens)
    return figure in path.read_text()


def figure_cells() -> list[tuple[str, str]]:
    """``(figure, linked path)`` of every link in the README's results table."""
    text = README.read_text()
    references = dict(REFERENCE.findall(text))
    return [(figure, target) for row in results_table(text) for cell in row
            for figure, target in cell_links(cell, references)]


def test_the_results_table_links_every_figure_to_a_committed_result_file():
    text = README.read_text()
    references = dict(REFERENCE.findall(text))
    header = text.split("\n## Results\n", 1)[1].split("\n| ", 1)[1].split(" |")[0]
    assert header == "result", "the results table's first column is 'result'"
    for row in results_table(text):
        figures = row[1]
        links = cell_links(figures, references)
        assert links, f"no linked figure in row {row[0]!r}"
        unlinked = NUMBER.findall(FIGURE_REF.sub("", FIGURE_LINK.sub("", figures)))
        assert not [n for n in unlinked if "." in n], f"row {row[0]!r}: figures without a file: {unlinked}"
        for _, target in links:
            assert target.startswith("benchmarks/results/"), f"{target}: not a result file"


@pytest.mark.parametrize(("figure", "target"), figure_cells(), ids=lambda x: x)
def test_every_figure_of_the_results_table_is_in_its_file(figure, target):
    path = REPO / target
    assert path.is_file(), f"{target} does not exist"
    assert figure_in_file(figure, path), f"{figure!r} is not in {target}"


def test_figure_matching(tmp_path):
    """What counts as the same figure: a value rounding to it in JSON, the written text elsewhere."""
    (tmp_path / "r.json").write_text(json.dumps({"speedup": 1.4219997, "n": 269, "ok": True, "per_round": [94.93]}))
    (tmp_path / "r.jsonl").write_text('{"mae": 0.8810408}\n{"mae": 0.9}\n')
    (tmp_path / "r.md").write_text("| quickstart | 0.901 ± 0.018 |\n")
    for figure in ("1.42", "1.42x", "1.4", "269", "94.9"):
        assert figure_in_file(figure, tmp_path / "r.json"), figure
    for figure in ("1.43", "1.420", "270", "2", "x"):
        assert not figure_in_file(figure, tmp_path / "r.json"), figure
    assert figure_in_file("0.881", tmp_path / "r.jsonl") and not figure_in_file("0.882", tmp_path / "r.jsonl")
    assert figure_in_file("0.901 ± 0.018", tmp_path / "r.md")
    assert not figure_in_file("0.901 ± 0.019", tmp_path / "r.md")


# ---------------------------------------------------------------- links


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(page: Path) -> list[str]:
    """Targets of the inline links and of the reference definitions of a page (not in code)."""
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text) + [target for _, target in REFERENCE.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{rel(page)}: link {target} -> {file} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{rel(page)}: link {target}: no heading #{anchor} in {file.name}"


def quoted_outputs() -> list[tuple[str, str, str]]:
    """``(page, result file, block)`` of every ```text block, with the last result ``.txt`` linked before it."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```text\n(.*?)```", text, flags=re.S):
            linked = re.findall(r"\]\(([^)\s]*benchmarks/results/[^)\s]+\.txt)\)", text[: match.start()])
            assert linked, f"{rel(page)}: a ```text block quotes no result file (link the .txt before it)"
            found.append((rel(page), linked[-1], match.group(1)))
    return found


@pytest.mark.parametrize(("page", "target", "block"), quoted_outputs(), ids=lambda x: x[:40])
def test_quoted_output_is_verbatim(page, target, block):
    """A quoted output is the result file's own lines (``...`` marks lines left out), in its order."""
    lines = (REPO / page).parent.joinpath(target).resolve().read_text().splitlines()
    at = 0
    for line in block.splitlines():
        if line.strip() == "...":
            continue
        assert line in lines[at:], f"{page}: {line!r} is not a line of {target} (after line {at})"
        at = lines.index(line, at) + 1


# ---------------------------------------------------------------- commands


def shell_commands(text: str) -> list[str]:
    """The commands of a page's shell code blocks: continuations joined, comments dropped, ``&&`` split."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang not in SHELL_BLOCKS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word != "&&":
                    command.append(word)
                elif command:
                    commands.append(shlex.join(command))
                    command = []
    return commands


def table_commands(text: str) -> list[str]:
    """The commands in tables: a whole cell of inline code (``| `python benchmarks/decode.py ...` |``), and
    every ``python ...`` inline code of the results table's command column."""
    cells = [cell.strip() for line in text.splitlines() if line.startswith("|") for cell in line.split("|")]
    found = [m.group(1) for cell in cells if (m := re.fullmatch(r"`((?:python|bincount|torchrun) [^`]*)`", cell))]
    if "\n## Results\n" in text:
        found += [c for row in results_table(text) for c in re.findall(r"`(python [^`]*)`", row[-1])]
    return found


def config_commands() -> list[str]:
    """The command each config file names in its first comment lines (``# python ...``)."""
    found = []
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        for line in path.read_text().splitlines()[:3]:
            if line.startswith(("# python ", "# bincount ")):
                found.append(line[2:].replace("\\", " "))
    return found


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` of every command in README.md's and docs/*.md's code blocks and tables, and
    in the config files' first lines."""
    out = [(rel(page), c) for page in PAGES
           for c in shell_commands(page.read_text()) + table_commands(page.read_text())]
    out += [("conf/", c) for c in config_commands()]
    seen: set[str] = set()
    return [(w, c) for w, c in out if not (c in seen or seen.add(c))]


def without_environment(argv: list[str]) -> list[str]:
    """``argv`` without leading ``NAME=value`` environment assignments."""
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    return argv


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A multirun's overrides with every sweep replaced by its first value (compose takes no sweeps)."""
    parser = OverridesParser.create()
    out = []
    for text in overrides:
        override = parser.parse_overrides([text])[0]
        if override.is_sweep_override():
            text = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
        out.append(text)
    return out


def check_hydra(config: str, args: list[str], tmp_path: Path) -> None:
    """Compose ``conf/<config>.yaml`` with the line's overrides; instantiate its data, model and CPU trainer."""
    from bincount.trainer import instantiate_trainer

    overrides = first_of_sweeps([a for a in args if a not in ("-m", "--multirun")])
    overrides = [o.replace("outputs/RUN", str(tmp_path)) for o in overrides]
    cfg = set_output_dir(compose(config, overrides, return_hydra_config=True), tmp_path)
    hydra.utils.instantiate(cfg.data)
    if config != "train":
        return
    with open_dict(cfg):  # no weights are downloaded: the name is checked, the file is not read
        weights, cfg.model.weights, cfg.model.weights_path = cfg.model.weights, None, None
    model = hydra.utils.instantiate(cfg.model)
    if weights:
        from torchvision.models import get_model_weights

        assert weights in get_model_weights(model.hparams.arch).__members__
    if cfg.trainer.accelerator in ("cpu", "auto"):
        with open_dict(cfg):
            del cfg["hydra"]
        instantiate_trainer(cfg)


def run_help(target: str, args: list[str], capsys) -> str:
    """The ``--help`` text of ``target`` after ``args``, run in this process (torch is loaded once;
    each script's own ``--help`` in a fresh interpreter is tested in ``test_benchmarks`` and by the
    installed wheel); fails unless it exits 0.

    ``target``: ``benchmarks/<script>.py``, ``sagemaker_launch.<module>`` or ``bincount``.
    """
    capsys.readouterr()
    argv = [*args, "--help"]
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        if target == "bincount":
            from bincount.cli import main

            main(argv)
        elif target.endswith(".py"):
            with patched_argv([target, *argv]), patched_path(str((REPO / target).parent)):
                runpy.run_path(str(REPO / target), run_name="__main__")
        else:
            with patched_argv([target, *argv]):
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{target} {shlex.join(argv)} exited {exit_info.value.code}: {err[-2000:]}"
    return out


@contextlib.contextmanager
def patched_argv(argv: list[str]):
    saved, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def patched_path(entry: str):
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def check_sagemaker(module: str, args: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    """``--help`` exits 0; the module's own parsing and composition accept ``args``."""
    from sagemaker_launch import deploy, launch, plan, register, transform, tune

    run_help(f"sagemaker_launch.{module}", [], capsys)
    if module in ("launch", "tune"):
        _, overrides = launch.parse_argv(args)
        cfg = compose("launch", overrides, return_hydra_config=module == "tune")
        if module == "launch":
            plan.plan_training_job(cfg, overrides)
        else:
            tune.search_space(cfg)
    elif module == "cost":
        compose("launch", args)
    elif module == "deploy":
        monkeypatch.chdir(tmp_path)  # invoke's local photos must exist: stand-ins
        for arg in args:
            if "=" not in arg and not arg.startswith("s3://") and arg not in deploy.COMMANDS:
                (tmp_path / arg).write_bytes(b"")
        _, overrides, _ = deploy.parse_argv(args)
        compose("deploy", overrides)
    elif module == "register":
        compose("register", register.parse_argv(args))
    elif module == "transform":
        _, overrides = transform.parse_argv(args)
        transform.check_config(compose("transform", overrides))
    else:
        raise AssertionError(f"sagemaker_launch.{module}: no check for this module")


def check_bincount(args: list[str], capsys) -> None:
    from bincount.cli import build_parser

    command = args[:2] if args[0] in ("data", "transform", "runs") else args[:1]
    run_help("bincount", command, capsys)
    build_parser().parse_args(args)  # SystemExit on an unknown option or a missing argument


def check_mlflow(args: list[str]) -> None:
    """``mlflow <command> [<subcommand>] --help`` exits 0 and names every ``--option`` of the line
    (``mlflow ui``, ``mlflow experiments csv``)."""
    command = list(itertools.takewhile(lambda a: not a.startswith("-"), args))
    proc = subprocess.run([str(Path(sys.executable).parent / "mlflow"), *command, "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mlflow {' '.join(command)} --help exited {proc.returncode}: {proc.stderr[-2000:]}"
    for option in (a.split("=")[0] for a in args[len(command):] if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", proc.stdout), f"mlflow {' '.join(command)}: no option {option}"


def check_benchmark(script: str, args: list[str], capsys) -> None:
    """``--help`` after the line's own arguments exits 0 (a bad value fails first); each option is in the help."""
    before = args[: args.index("--")] if "--" in args else args  # after "--": the script's overrides
    text = run_help(script, before, capsys)
    for option in (a.split("=")[0] for a in before if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", text), f"{script}: no option {option} in --help"


def check_pytest(args: list[str]) -> None:
    declared = {m.split(":")[0].strip() for m in
                tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
    if "-m" in args:
        expression = args[args.index("-m") + 1]
        named = set(re.findall(r"\w+", expression)) - {"and", "or", "not"}
        assert named <= declared, f"markers {sorted(named - declared)} are not declared in pyproject.toml"


def check_command(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    # logger=mlflow: a store the logger would first reach when the run starts; the default, mlflow.db
    # in the working folder, would be created in the repository as soon as the logger is built
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    argv = without_environment(shlex.split(command))
    if any(tuple(argv[: len(prefix)]) == prefix for prefix in NOT_CHECKED):
        return
    program, args = argv[0], argv[1:]
    if program == "torchrun":
        program, args = "python", args[args.index("train.py"):]
    if program == "python" and args[:1] in (["train.py"], ["eval.py"]):
        check_hydra(args[0].removesuffix(".py"), args[1:], tmp_path)
    elif program in ("bincount-train", "bincount-eval"):
        check_hydra(program.removeprefix("bincount-"), args, tmp_path)
    elif program == "python" and args[:1] == ["-m"] and args[1].startswith("sagemaker_launch."):
        check_sagemaker(args[1].split(".", 1)[1], args[2:], tmp_path, monkeypatch, capsys)
    elif program == "python" and args[:2] == ["-m", "pytest"]:
        check_pytest(args[2:])
    elif program == "python" and args[:1] and args[0].startswith("benchmarks/"):
        check_benchmark(args[0], args[1:], capsys)
    elif program == "bincount":
        check_bincount(args, capsys)
    elif program == "mlflow":
        check_mlflow(args)
    elif program == "bash":
        assert (REPO / args[0]).is_file(), f"{args[0]} does not exist"
    else:
        raise AssertionError(f"no check for this kind of command: {command}")


COMMANDS = documented_commands()


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c[:70]}" for w, c in COMMANDS])
def test_every_documented_command_parses(where, command, tmp_path, monkeypatch, capsys):
    check_command(command, tmp_path, monkeypatch, capsys)


def test_the_quickstart_is_two_commands():
    """The first code block: set up + the quickstart run, then the tests (.ci/run depends on them)."""
    first = shell_commands(re.search(r"```bash\n.*?```", README.read_text(), flags=re.S).group(0))
    assert first[-2:] == ["python train.py +experiment=quickstart data.root=../shared/abid",
                          "python -m pytest -q -n auto -m 'not slow'"]
    ci = (REPO / ".ci/run").read_text().replace('"', "'")
    assert "uv pip install -q -e '.[dev]'" in ci and "python -m pytest -q -n auto -m 'not slow'" in ci
