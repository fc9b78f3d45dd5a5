"""Hugging Face exports of every encoding, loaded where tape_pretrain is not installed (hf_export_probe.py in a
subprocess), compute the project's logits and greedy tokens, decode with their cache, and tokenize as prep did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

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
    config = json.loads((root / "tape" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tape_pretrain.TapePretrainForCausalLM"
    assert "auto_map" not in json.loads((root / "rope" / "config.json").read_text())


def test_model_card_reports_the_training(exports):
    card = (exports[0] / "tape" / "README.md").read_text()
    for expected in ("TAPE", "| steps | 3 |", "| tokens trained | 12,288 |", "f" * 64, "| final val loss | 5.4321 |",
                     "trust_remote_code=True"):
        assert expected in card
    assert "trust_remote_code" not in (exports[0] / "rope" / "README.md").read_text()


def test_a_rope_export_over_a_tape_one_leaves_no_modeling_code(tmp_path, tokenizer_path):
    out = tmp_path / "export"
    (out).mkdir()
    (out / "notes.py").write_text("# the user's own file\n")
    for name in ("tape", "rope"):
        model = tiny_model(name)
        save_export(model.state_dict(), model.config, out, None)
    assert sorted(p.name for p in out.glob("*.py")) == ["notes.py"]


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
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(exports[0] / "hf_home"))
    export = exports[0] / "tape"
    main(["eval", str(export), "--lm-eval", "tiny_choice", "--lm-eval-include", str(tmp_path), "--batch-size", "2",
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
    assert "tiny_choice" in (tmp_path / "out" / "lm_eval.md").read_text()
    assert "acc" in capsys.readouterr().out
