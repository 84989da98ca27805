"""The model and data a compressor's smoke run uses (``Smoke.setups`` in compressors/base.py).

Each setup trains in seconds on 2 CPU cores, on real embedded data: a run of every stage, not of
every epoch. Tests add their own shrinking on top (tests/conftest.py ``TINY``).
"""

from __future__ import annotations

SETUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("data=digits",),  # LeNet-300-100 on the 8x8 digits
    "resnet": ("data=digits", "model=resnet20", "model.depth=8", "model.width=8"),
    "vit": ("data=digits", "model=vit_tiny", "model.dim=32", "model.depth=2", "model.heads=2"),
    # a randomly initialised 2-layer BERT (4 heads, FFN 64) on Rotten Tomatoes, with MiniLM's tokenizer
    "bert": ("model=minilm_l6", "data=rotten_tomatoes", "data.train_subset=128", "data.max_length=32",
             "data.eval_batch_size=16", "trainer.limit_train_batches=2", "model.pretrained=null",
             "+model.hf_config.hidden_size=32", "+model.hf_config.num_hidden_layers=2",
             "+model.hf_config.num_attention_heads=4", "+model.hf_config.intermediate_size=64"),
    # a 2-layer Llama-style LM (width 32) on 32-byte blocks of the embedded English corpus
    "lm": ("model=lm_tiny", "data=embedded_english", "data.tokenizer=bytes", "data.seq_len=32",
           "data.train_subset=64", "data.batch_size=16", "model.hidden=32", "model.layers=2", "model.heads=2",
           "model.ffn=64", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"),
}
