import json

import pytest
import torch

from autoround.quantizer.data import (
    DEFAULT_DATASET, calibration_batch, packaged_texts, parse_dataset_spec,
)
from autoround.quantizer.errors import DatasetError


class CharTokenizer:
    """A real-enough tokenizer for data tests: one token per character."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 200) for c in text]}


def test_parse_spec():
    specs = parse_dataset_spec("./a.json,NeelNanda/pile-10k:num=256:concat=True,mbpp:split=train+validation")
    assert [s.name for s in specs] == ["./a.json", "NeelNanda/pile-10k", "mbpp"]
    assert specs[1].num == 256 and specs[1].concat is True
    assert specs[2].split == "train+validation"


@pytest.mark.parametrize("spec,msg", [
    ("x:nmu=3", "unknown dataset option 'nmu'"),
    ("x:num=-1", "num must be a positive integer"),
    ("x:concat=perhaps", "concat must be True or False"),
    (",", "empty dataset spec"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(DatasetError, match=msg):
        parse_dataset_spec(spec)


def test_local_files(tmp_path):
    tok = CharTokenizer()
    (tmp_path / "a.txt").write_text("x" * 50 + "\n\n" + "y" * 10 + "\n\n" + "z" * 40)
    batch = calibration_batch(str(tmp_path / "a.txt"), tok, nsamples=8, seqlen=20)
    assert batch.shape == (2, 20)  # the 10-character paragraph is too short and dropped
    concat = calibration_batch(str(tmp_path / "a.txt") + ":concat=True", tok, nsamples=8, seqlen=20)
    assert concat.shape[0] == 5  # 50 + 10 + 40 chars + 3 eos = 103 tokens -> 5 windows
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "w" * 30}) for _ in range(4)))
    assert calibration_batch(str(tmp_path / "b.jsonl") + ":num=3", tok, 8, 16).shape == (3, 16)
    (tmp_path / "c.json").write_text(json.dumps([{"content": "q"}]))
    with pytest.raises(DatasetError, match="'text' field"):
        calibration_batch(str(tmp_path / "c.json"), tok, 8, 16)


def test_too_short_and_missing():
    tok = CharTokenizer()
    with pytest.raises(DatasetError, match="no calibration sample has 64 tokens"):
        calibration_batch(["short text"], tok, 4, 64)
    with pytest.raises(DatasetError, match="does not exist"):
        calibration_batch("./nope.txt", tok, 4, 8)
    with pytest.raises(DatasetError, match="nsamples and seqlen must be positive"):
        calibration_batch(["abc"], tok, 0, 8)


def test_token_inputs_and_determinism():
    seqs = [torch.arange(i, i + 40) for i in range(10)]
    a = calibration_batch(seqs, None, 4, 32, seed=3)
    b = calibration_batch(seqs, None, 4, 32, seed=3)
    c = calibration_batch(seqs, None, 4, 32, seed=4)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    dicts = [{"input_ids": s.tolist()} for s in seqs]
    assert calibration_batch(dicts, None, 4, 32, seed=3).shape == (4, 32)
    loader = torch.utils.data.DataLoader(torch.stack(seqs), batch_size=5)
    assert calibration_batch(loader, None, 20, 32).shape == (10, 32)


def test_offline_default_falls_back_to_packaged_corpus(caplog, in_process):
    # tests run with HF_DATASETS_OFFLINE=1: the hub dataset cannot load, the packaged corpus is used
    tok = CharTokenizer()
    batch = calibration_batch(DEFAULT_DATASET, tok, nsamples=4, seqlen=256)
    assert batch.shape == (4, 256)
    assert "packaged offline corpus" in caplog.text
    assert len(packaged_texts()) > 50


def test_other_hub_dataset_offline_names_local_alternative():
    with pytest.raises(DatasetError, match="pass a local file instead"):
        calibration_batch("someone/some-dataset", CharTokenizer(), 4, 16)


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setenv("AR_DISABLE_DATASET_SUBPROCESS", "1")


def test_spec_quotes_chat_template_and_system_prompt():
    (spec,) = parse_dataset_spec('./a.txt:apply_chat_template:system_prompt="You are: brief, exact.":num=4')
    assert spec.apply_chat_template and spec.system_prompt == "You are: brief, exact." and spec.num == 4
    a, b = parse_dataset_spec("x:system_prompt='hi, there',y:concat")
    assert a.apply_chat_template and a.system_prompt == "hi, there" and b.name == "y" and b.concat
    with pytest.raises(DatasetError, match="unbalanced quote"):
        parse_dataset_spec('x:system_prompt="oops')


def test_chat_template_needs_one(tmp_path, in_process):
    (tmp_path / "a.txt").write_text("x" * 50)
    with pytest.raises(DatasetError, match="no chat template"):
        calibration_batch(str(tmp_path / "a.txt") + ":apply_chat_template", CharTokenizer(), 2, 8)


def test_chat_template_and_subprocess_tokenization(tmp_path, smollm2_folder, monkeypatch):
    """The real SmolLM2 tokenizer: chat-formatted samples carry the system prompt; tokenizing in a child process
    (the default) gives exactly the in-process result."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    monkeypatch.setenv("AR_DISABLE_DATASET_SUBPROCESS", "0")
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i}: " + "words and more words " * 20 for i in range(6)))
    spec = str(tmp_path / "a.txt") + ':apply_chat_template:system_prompt="Be brief: always."'
    child = calibration_batch(spec, tok, 4, 48)
    monkeypatch.setenv("AR_DISABLE_DATASET_SUBPROCESS", "1")
    here = calibration_batch(spec, tok, 4, 48)
    assert torch.equal(child, here)
    text = tok.decode(here[0])
    assert "<|im_start|>system" in text and "Be brief: always." in text and "<|im_start|>user" in text
    plain = calibration_batch(str(tmp_path / "a.txt"), tok, 4, 48)
    assert not torch.equal(plain, here)
