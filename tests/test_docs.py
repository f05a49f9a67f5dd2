"""README and docs/ as a newcomer uses them: every command they show parses as written (options
that exist, values in range), and the demo command runs as written. The Python snippet is run by
tests/test_cli.py."""
import inspect
import math
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import devices
import emerdiff
import evaluate
import inputs
import runner
from command_line import OUTPUTS, priced_calls
from conftest import ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "weights.md", ROOT / "tools" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("emerdiff.py", "evaluate.py", "tools/bench.py")


def code_lines(document) -> list[str]:
    """The lines of the fenced code blocks of a Markdown file, then its inline code spans."""
    text = document.read_text()
    fenced = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    return fenced + inline


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(document, script, arguments) for each `python <script> ...` in code; commands chained with &&
    are taken one by one, comments cut; usage synopses ([options], {a,b}) and a script named without
    arguments are not commands."""
    found = []
    for document in DOCUMENTS:
        for line in code_lines(document):
            for command in line.split("&&"):
                command = re.split(r"\s#\s", command)[0].strip()
                match = re.fullmatch(rf"python ({'|'.join(map(re.escape, SCRIPTS))})(.*)", command)
                if match and match[2].strip() and not re.search(r"[\[{]", match[2]):  # not a mere mention
                    found.append((document.name, match[1], shlex.split(match[2])))
    return found


COMMANDS = documented_commands()


def test_the_documents_show_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)


@pytest.mark.parametrize("document, script, arguments", COMMANDS,
                         ids=[f"{d}: {s} {' '.join(a)}"[:80] for d, s, a in COMMANDS])
def test_every_documented_command_parses(document, script, arguments):
    try:
        if script == "emerdiff.py":
            runner.method_options(runner.parse_args(arguments))  # also checks every option's range
        elif script == "evaluate.py":
            evaluate.parse_args(arguments)
        else:
            bench.parse_args(arguments)
    except SystemExit as e:  # argparse refused it (or showed --help: exit 0)
        if e.code:
                pytest.fail(f"{document}: python {script} {' '.join(arguments)}: refused (exit {e.code})")


def test_the_demo_command_runs_as_written(tmp_path):
    """README's command for a look without the weights: a tiny random-weight model, the example image."""
    demo, = [line for line in code_lines(ROOT / "README.md") if line.startswith("python ") and "--random-weights" in line]
    python, script, *arguments = shlex.split(demo)
    assert (python, script) == ("python", "emerdiff.py")
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # run from a folder like the repository's, writing there
    result = subprocess.run([sys.executable, str(ROOT / script), *arguments], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "its segments mean nothing" in result.stderr
    out = tmp_path / arguments[arguments.index("--out") + 1] / "chelsea"
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    labels = np.load(out / "labels.npy")
    masks = int(arguments[arguments.index("--masks") + 1])
    assert labels.shape == (300, 451) and 1 < len(np.unique(labels)) <= masks


def test_the_functions_docs_say_to_copy_out_run_alone():
    """docs/api.md's list of functions to copy out of emerdiff.py, with the check of their arguments out of
    inputs.py: exactly their source, run in a namespace holding only the imports it names, clusters three
    separated blobs and blurs as the module does."""
    text = " ".join((ROOT / "docs" / "api.md").read_text().split())
    listed = re.search(r"To take single functions instead: (.*?): copy these", text)[1]
    names = re.findall(r"`(\w+)`", listed.split(" need only ")[0])
    checks = re.findall(r"`(\w+)`", listed.split("inputs.py's ")[1])  # the check of their arguments
    assert {"kmeans", "gaussian_blur"} <= set(names) and "check_tensors" in checks
    namespace = {"math": math, "torch": torch, "F": F}
    for module, name in [*((inputs, name) for name in checks), *((emerdiff, name) for name in names)]:
        exec(inspect.getsource(getattr(module, name)), namespace)
    blobs = torch.cat([torch.randn(30, 5) * 0.1 + centre for centre in (0.0, 5.0, -5.0)])
    labels, _ = namespace["kmeans"](blobs, 3, n_init=4, generator=torch.Generator().manual_seed(0))
    assert [len(set(labels[i:i + 30].tolist())) for i in (0, 30, 60)] == [1, 1, 1] and len(set(labels.tolist())) == 3
    images = torch.rand(2, 3, 9, 11)
    assert torch.equal(namespace["gaussian_blur"](images), emerdiff.gaussian_blur(images))


def test_the_measured_constants_table_holds_the_codes_values():
    """docs/speed.md's table "Measured constants" is where README and the docs take those numbers from:
    each row's value is the value of the constant it names, and every constant it names exists."""
    import speed
    modules = {"devices": devices, "inputs": inputs, "speed": speed}
    text = (ROOT / "docs" / "speed.md").read_text()
    section = text.split("## Measured constants", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)\.(\w+)` \| ([^|]+) \|", section, re.M)
    assert len(rows) >= 7
    for module, name, value in rows:
        assert repr(getattr(modules[module], name)) == value.strip(), (module, name)


def test_the_estimate_line_is_documented_as_the_code_prints_it(sd, monkeypatch, capsys):
    """docs/command-line.md's form of the estimate line is what a run prints before its first image, word for
    word, with the times the page names in place of those taken on the spot (a clock that only the model's
    calls move, each by its documented time) and the defaults at 512x512: so its numbers are those the code's
    cost model and constants give. (plain: speed.py's choices are not measured under this clock; the line
    does not depend on them.)"""
    text = (ROOT / "docs" / "command-line.md").read_text()
    prose, block = text.split("The form of the line", 1)[1].split("```\n", 1)
    documented = block.split("\n```", 1)[0]
    times = re.search(r"a UNet call of one image ([\d.]+) s, its fixed cost ([\d.]+) s, a decode ([\d.]+) s and the "
                      r"slowest timed call (\d+) % slower", " ".join(prose.split()))
    unet_s, fixed_s, decode_s, slower = map(float, times.groups())
    priced_calls(monkeypatch, sd, unet_s, fixed_s, decode_s, slowest=1 + slower / 100)
    monkeypatch.setattr(runner, "LONG_RUN_S", 0)
    runner.announce_long_run(sd, (512, 512), emerdiff.DEFAULTS | dict(speed=devices.SPEED | dict(plain=True)))
    assert capsys.readouterr().err == documented + "\n"
