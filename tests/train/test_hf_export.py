"""Hugging Face exports of every encoding, loaded where tape_pretrain is not installed (hf_export_probe.py in a
subprocess), compute the project's logits and greedy tokens, decode with their cache, and tokenize as prep did."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from tape_pretrain.config import POSITIONAL_NAMES, ModelConfig, PositionalConfig
from tape_pretrain.models import build_model
from tape_pretrain.train.export import MODELS_PACKAGE, save_export, shipped_model_files
from tape_pretrain.train.model_card import TrainingFacts

pytestmark = [pytest.mark.slow]

# RandPE twice: its default eval mode (sampled positions) cannot cache, "expected" positions can.
EXPORTS = (*POSITIONAL_NAMES, "randrope_expected")
PROMPT, NEW_TOKENS = 7, 10
SAMPLE = "def main(argv):\n    return  sum(x ** 2 for x in argv)  # café ✓\n\t東京 🙂"
FACTS = TrainingFacts(steps=3, tokens=3 * 4096, data_fingerprint="f" * 64, final_val_loss=5.4321)


def tiny_model(export_name: str):
    encoding = export_name.removesuffix("_expected")
    positional = PositionalConfig(name=encoding, randrope_eval="expected" if export_name.endswith("_expected")
                                  else "sample")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=None, vocab_size=512, hidden_size=64, num_layers=3, num_heads=4,
                                    ffn_hidden_size=96, max_seq_len=64, positional=positional)).eval()
    with torch.no_grad():  # off the initialisation (TAPE's updates start at zero): every weight shapes the logits
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_path):
    """ROOT/<name>: an export per encoding (the project's model, its input ids and reference outputs), and
    ROOT/probe.pt: what transformers computed from each, without tape_pretrain."""
    root = tmp_path_factory.mktemp("hf_exports")
    (root / "sample.txt").write_text(SAMPLE, encoding="utf-8")
    tokenizer = Path(tokenizer_path).read_bytes()
    reference = {}
    for name in EXPORTS:
        model = tiny_model(name)
        save_export(model.state_dict(), model.config, root / name, tokenizer, FACTS)
        ids = torch.randint(4, 512, (2, 40), generator=torch.Generator().manual_seed(1))
        torch.save({"ids": ids, "prompt_len": PROMPT, "new_tokens": NEW_TOKENS}, root / name / "inputs.pt")
        with torch.no_grad():
            greedy = torch.stack(list(model.generate_greedy(ids[:1, :PROMPT], NEW_TOKENS,
                                                            use_cache=model.cache_refusal() is None)), dim=1)
            reference[name] = {"logits": model(ids), "tokens": torch.cat([ids[:1, :PROMPT], greedy], dim=1)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    probe = Path(__file__).with_name("hf_export_probe.py")
    result = subprocess.run([sys.executable, "-I", str(probe), str(root)], env=env, cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, reference, torch.load(root / "probe.pt")


@pytest.mark.parametrize("name", EXPORTS)
def test_export_computes_the_projects_logits_and_greedy_tokens(exports, name):
    root, reference, probed = exports
    got = probed[name]
    assert got["class"] == ("LlamaForCausalLM" if name == "rope" else "TapePretrainForCausalLM")
    assert (got["logits"] - reference[name]["logits"]).abs().max().item() <= 1e-5
    assert torch.equal(got["cached"], got["uncached"])
    assert torch.equal(got["cached"], reference[name]["tokens"])


@pytest.mark.parametrize("name", [n for n in EXPORTS if n != "rope"])  # RoPE: stock Llama, transformers' own code
def test_the_wrapper_computes_loss_and_kept_logits_and_refuses_padding(exports, name):
    root, reference, probed = exports
    got, logits = probed[name], reference[name]["logits"]
    ids = torch.load(root / name / "inputs.pt")["ids"]
    expected = F.cross_entropy(logits[:, 2:-1].flatten(0, 1), ids[:, 3:].flatten())  # labels -100 on the first 3
    assert got["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert (got["last_two"] - logits[:, -2:]).abs().max().item() <= 1e-5
    assert got["padded_refused"]
    assert got["config_special_ids"] == got["tokenizer_special_ids"] == [1, 2, 3]


@pytest.mark.parametrize("name", EXPORTS)
def test_generate_decodes_through_the_cache(exports, name):
    """With the cache, the prompt runs once and each later step one token; RandPE's sampled positions cannot be
    cached, and it recomputes the prefix instead."""
    lengths = exports[2][name]["cached_forward_lengths"]
    if name == "randrope":
        assert lengths == list(range(PROMPT, PROMPT + NEW_TOKENS))
    else:
        assert lengths == [PROMPT] + [1] * (NEW_TOKENS - 1)


def test_tokenizer_round_trips_as_sentencepiece_encodes(exports, tokenizer_path):
    sentencepiece = spm.SentencePieceProcessor(model_file=tokenizer_path)
    for got in exports[2].values():
        assert got["sample_ids"] == sentencepiece.encode(SAMPLE)
        assert got["decoded"] == SAMPLE
        assert got["eos_token_id"] == sentencepiece.eos_id()


def test_shipped_code_is_the_projects_byte_for_byte(exports):
    root = exports[0]
    shipped = {p.name for p in shipped_model_files()}
    assert {"modeling_tape_pretrain.py", "configuration_tape_pretrain.py", "transformer.py", "cache.py",
            "tape.py"} <= shipped
    for name in EXPORTS:
        code = sorted(p.name for p in (root / name).glob("*.py"))
        assert code == ([] if name == "rope" else sorted(shipped))
        for file in code:
            assert (root / name / file).read_bytes() == (MODELS_PACKAGE / file).read_bytes()
    # transformers 4 copies only the modeling file's own relative imports: they must name every shipped module
    direct = set(re.findall(r"^from \.(\w+) import", (MODELS_PACKAGE / "modeling_tape_pretrain.py").read_text(),
                            re.MULTILINE))
    assert {f"{name}.py" for name in direct} | {"modeling_tape_pretrain.py"} == shipped
    config = json.loads((root / "tape" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tape_pretrain.TapePretrainForCausalLM"
    assert "auto_map" not in json.loads((root / "rope" / "config.json").read_text())


def test_model_card_reports_the_training(exports):
    card = (exports[0] / "tape" / "README.md").read_text()
    for expected in ("TAPE", "| steps | 3 |", "| tokens trained | 12,288 |", "f" * 64, "| final val loss | 5.4321 |",
                     "trust_remote_code=True"):
        assert expected in card
    assert "trust_remote_code" not in (exports[0] / "rope" / "README.md").read_text()


def test_an_export_replaces_only_its_own_files_and_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    for name in ("notes.py", "convert.py"):  # the user's own files (one named like a module that is not shipped)
        (out / name).write_text("# mine\n")
    tape, rope = tiny_model("tape"), tiny_model("rope")
    save_export(tape.state_dict(), tape.config, out, None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("tape_pretrain.train.export.model_card", lambda *a: 1 / 0)  # fails after the weights
    with pytest.raises(ZeroDivisionError):
        save_export(rope.state_dict(), rope.config, out, None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, whole
    assert not list(tmp_path.glob(".export.partial-*"))
    monkeypatch.undo()
    save_export(rope.state_dict(), rope.config, out, None)  # RoPE over TAPE: no modeling code left behind
    assert sorted(p.name for p in out.glob("*.py")) == ["convert.py", "notes.py"]


def test_a_unigram_tokenizer_is_exported_without_hugging_face_files(tmp_path, corpus_dir, capsys):
    from tape_pretrain.data.tokenizer import train_tokenizer

    train_tokenizer([str(corpus_dir / "part-0.jsonl")], vocab_size=400, out=str(tmp_path / "uni.model"),
                    model_type="unigram", max_sentences=200)
    model = tiny_model("tape")
    save_export(model.state_dict(), model.config, tmp_path / "export", (tmp_path / "uni.model").read_bytes())
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == (tmp_path / "uni.model").read_bytes()
    assert not (tmp_path / "export" / "tokenizer.json").exists()
    assert "no Hugging Face tokenizer files" in capsys.readouterr().out


def test_push_to_hub_checks_the_repository_id_before_exporting(tmp_path, capsys):
    from tape_pretrain.cli import main

    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "out"), "--push-to-hub", "no-slash"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lm_eval_loglikelihoods_equal_the_projects(exports, tokenizer_path, tmp_path, monkeypatch, capsys):
    """lm-evaluation-harness (its stock hf model, trust_remote_code) on a local multiple-choice task over a JSONL
    file: every loglikelihood it reports is the project's for the same strings."""
    from tape_pretrain.cli import main
    from tape_pretrain.eval.harness import continuation_loglikelihoods

    rows = [{"context": "def main(argv):", "choices": ["return 0", "pass", "import os"], "gold": 0},
            {"context": "for i in range(10):\n   ", "choices": ["print(i)", "break"], "gold": 1},
            {"context": "class Parser:", "choices": ["\n    def parse(self):", " pass  # é"], "gold": 0}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n")
    (tmp_path / "tiny_generate.yaml").write_text(  # greedy generation, whose prompts lm-eval pads on the left
        "task: tiny_generate\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{choices[0]}}"\n'
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    higher_is_better: true\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(exports[0] / "hf_home"))
    export = exports[0] / "tape"
    main(["eval", str(export), "--lm-eval", "tiny_choice,tiny_generate", "--lm-eval-include", str(tmp_path),
          "--batch-size", "2",
          "--lm-eval-log-samples", "--out", str(tmp_path / "out"), "--device", "cpu", "--dtype", "fp32"])
    results = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    samples = results["samples"]["tiny_choice"]
    assert len(samples) == len(rows)
    model = tiny_model("tape")
    sentencepiece = spm.SentencePieceProcessor(model_file=tokenizer_path)
    for sample in samples:
        pairs = [tuple(argument[:2]) for argument in sample["arguments"]]
        ours = continuation_loglikelihoods(model, sentencepiece.encode, pairs)
        theirs = [response[0] for response in sample["resps"]]
        for (our_ll, our_greedy), (their_ll, their_greedy) in zip(ours, theirs, strict=True):
            assert abs(our_ll - their_ll) <= 1e-4 * max(1.0, abs(our_ll))
            assert our_greedy == their_greedy
    table = (tmp_path / "out" / "lm_eval.md").read_text()
    assert "tiny_choice" in table and "tiny_generate" in table
    generated = results["samples"]["tiny_generate"]
    assert len(generated) == len(rows) and all(isinstance(s["resps"][0][0], str) for s in generated)
    assert "--batch-size 2 -> 1" in capsys.readouterr().out
