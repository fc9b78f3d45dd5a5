"""The CLI documents itself: a description of the tool, help and a default for every option, --version, and
`config show`, which lists every key of the run config with its value, default and docstring."""

import argparse
import dataclasses
import inspect
import re
import typing
from importlib import metadata

import pytest

from tape_pretrain import config as config_module
from tape_pretrain.cli import build_parser, main
from tape_pretrain.config import RunConfig


def subparsers(parser: argparse.ArgumentParser, prefix: str = "tape-pretrain"):
    """(command line, parser) of the parser and every subcommand below it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subparsers(child, f"{prefix} {name}")


def test_top_level_help_says_what_the_tool_does_and_in_which_order(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "no logic of its own" not in out
    assert "Pretrain decoder-only language models with TAPE" in out
    order = [out.index(f"tape-pretrain {command}") for command in ("prep", "train CONFIG", "eval", "export")]
    assert order == sorted(order)
    assert "README.md" in out and "tape-pretrain config show" in out


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    checked = 0
    for command, parser in subparsers(build_parser()):
        formatter = parser.formatter_class(command)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"{command} {name} has no help text"
            flag = action.option_strings and action.nargs == 0  # store_true / store_false: off unless given
            if action.option_strings and not flag and not action.required:
                shown = formatter._get_help_string(action) % {"default": action.default}
                assert "default" in shown.lower(), f"{command} {name}: help does not show the default ({shown!r})"
                checked += 1
    assert checked > 50


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tape-pretrain {metadata.version('tape-pretrain')}"


def test_train_help_says_how_to_list_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "tape-pretrain config show" in capsys.readouterr().out


# ---- config show --------------------------------------------------------------------------------


def source_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the docstring literal below it, read from the class source with a regular expression."""
    source = inspect.getsource(cls)
    docs = {}
    for match in re.finditer(r'^    (\w+): [^\n]+\n    """(.*?)"""', source, re.S | re.M):
        docs[match.group(1)] = " ".join(match.group(2).split())
    return docs


def leaf_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """Every leaf key of a config dataclass tree with its docstring (a field whose type is a dataclass is a
    section)."""
    hints = typing.get_type_hints(cls)
    docs = source_docstrings(cls)
    out = {}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            out.update(leaf_keys(hints[field.name], f"{prefix}{field.name}."))
        else:
            out[f"{prefix}{field.name}"] = docs.get(field.name, "")
    return out


def shown_keys(text: str) -> dict[str, tuple[str, str]]:
    """`config show` output: key -> (the key's line after the key, its docstring as one line)."""
    keys: dict[str, tuple[str, list[str]]] = {}
    key = None
    for line in text.splitlines():
        if line.startswith(" "):
            keys[key][1].append(line.strip())
        else:
            key, _, rest = line.partition(" = ")
            keys[key] = (rest, [])
    return {key: (rest, " ".join(doc)) for key, (rest, doc) in keys.items()}


def test_config_show_lists_every_leaf_key_with_its_docstring(capsys):
    expected = leaf_keys()
    assert len(expected) > 80 and all(expected.values()), [k for k, doc in expected.items() if not doc]
    assert main(["config", "show"]) == 0
    shown = shown_keys(capsys.readouterr().out)
    assert list(shown) == list(expected)  # every leaf, depth first in field order
    for key, doc in expected.items():
        assert shown[key][1] == doc, key
    assert shown["trainer.seq_len"][0] == "256  (default: 256)"
    assert shown["model.positional.name"][0] == "tape  (default: tape)"
    assert shown["model.vocab_size"][0] == "null  (default: null)"


def test_config_show_diff_lists_exactly_the_keys_that_differ_from_the_defaults(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  seq_len: 128\n  max_steps: 100\ndata:\n  path: /data/x\n")
    assert main(["config", "show", str(path), "model.positional.name=rope", "optim.betas=[0.9, 0.99]",
                 "seed=1234", "--diff"]) == 0
    shown = shown_keys(capsys.readouterr().out)
    # trainer.max_steps and seed are set to their defaults: not differences
    assert set(shown) == {"trainer.seq_len", "data.path", "model.positional.name", "optim.betas"}
    assert shown["trainer.seq_len"][0] == "128  (default: 256)"
    assert shown["optim.betas"][0] == "[0.9, 0.99]  (default: [0.9, 0.95])"
    assert shown["model.positional.name"][1] == "Which positional encoding the attention uses."


def test_config_show_takes_overrides_without_a_file(capsys):
    assert main(["config", "show", "seed=5", "trainer.log_interval=2", "--diff"]) == 0
    assert set(shown_keys(capsys.readouterr().out)) == {"seed", "trainer.log_interval"}
    assert main(["config", "show", "--diff"]) == 0
    assert capsys.readouterr().out.strip() == "every key has its default value"


@pytest.mark.parametrize("args, message", [
    (["trainer.nope=1"], "error: unknown config key trainer.nope"),
    (["trainer.seq_len=abc"], "error: trainer.seq_len: expected an integer"),
    (["BAD_YAML"], "is not valid YAML"),
    (["MISSING"], "does not exist"),
])
def test_config_show_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "bad.yaml").write_text("trainer: [1, 2\n")
    args = [{"BAD_YAML": str(tmp_path / "bad.yaml"), "MISSING": str(tmp_path / "none.yaml")}.get(a, a) for a in args]
    assert main(["config", "show", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_config_docstrings_come_from_the_source():
    """describe_config reads each field's docstring from config.py, for every config dataclass there."""
    for cls in vars(config_module).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == config_module.__name__:
            assert config_module.field_docs(cls) == source_docstrings(cls), cls.__name__


# ---- plot -------------------------------------------------------------------------------------


def test_plot_draws_the_given_runs_through_plot_runs(monkeypatch, capsys, tmp_path):
    from tape_pretrain.train import plot

    calls = []

    def plot_runs(run_dirs, out):
        calls.append((run_dirs, out))
        return [tmp_path / "loss.png"]

    monkeypatch.setattr(plot, "plot_runs", plot_runs)
    assert main(["plot", "runs/a", "runs/b", "--out", str(tmp_path)]) == 0
    assert calls == [(["runs/a", "runs/b"], str(tmp_path))]
    assert capsys.readouterr().out.strip() == str(tmp_path / "loss.png")
    assert main(["plot", "runs/a"]) == 0
    assert calls[-1] == (["runs/a"], None)
