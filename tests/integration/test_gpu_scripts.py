"""The GPU scripts run only when a device is lent (15 minutes, all tries together), so a flag or a config
name they pass that a benchmark no longer accepts would cost a lease to find out. Every python command
in benchmarks/gpu_check.sh and gpu_step.sh is parsed here by its script's own argument parser; nothing
is run."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_SCRIPTS = ("benchmarks/gpu_check.sh", "benchmarks/gpu_step.sh")
# the shell variables the commands read, with values of the kind they hold there
SHELL_VALUES = {'"${seqs[@]}"': "8192", '"$layers"': "4", "$out": "results", "${gpu}": "h200"}


def python_commands(script: str) -> list[tuple[str, list[str]]]:
    """(benchmark path, its arguments) for each `python benchmarks/....py ...` command in a shell script."""
    text = (ROOT / script).read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        code = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
        for var, value in SHELL_VALUES.items():
            code = code.replace(var, value)
        words = shlex.split(code)
        for i, word in enumerate(words[:-1]):
            if word == "python" and words[i + 1].startswith("benchmarks/") and words[i + 1].endswith(".py"):
                found.append((words[i + 1], words[i + 2:]))
    return found


COMMANDS = [(script, path, argv) for script in GPU_SCRIPTS for path, argv in python_commands(script)]


def test_the_gpu_scripts_have_their_commands():
    """The parsing above finds what the scripts run (a change of their form must not empty the test)."""
    per_script = {s: [p for sc, p, _ in COMMANDS if sc == s] for s in GPU_SCRIPTS}
    assert len(per_script["benchmarks/gpu_check.sh"]) >= 9, per_script
    assert per_script["benchmarks/gpu_step.sh"] == ["benchmarks/bench_finetune.py"], per_script


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script,path,argv", COMMANDS,
                         ids=[f"{Path(s).stem}:{Path(p).stem}:{i}" for i, (s, p, _) in enumerate(COMMANDS)])
def test_each_gpu_command_parses(script, path, argv, monkeypatch):
    file = ROOT / path
    assert file.is_file(), f"{script} runs {path}, which does not exist"
    spec = importlib.util.spec_from_file_location(f"_gpu_command_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        module.main(argv)
    except SystemExit as e:  # argparse's way of refusing: an unknown flag, or a value not among the choices
        pytest.fail(f"{script}: {path} refuses its arguments (exit {e.code}): {shlex.join(argv)}")
    except _Parsed as parsed:
        args = parsed.args[0]
        assert getattr(args, "device", "cuda") == "cuda", f"{path} in {script} must run on the GPU"
    else:
        pytest.fail(f"{path}.main() returned without parsing its arguments")
