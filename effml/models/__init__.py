"""Models, registered in ``effml.registry.MODELS``.

Contract:
- the registered target is an ``nn.Module`` subclass with ``from_config(cfg, info) -> module``
  (``info`` is the datamodule's ``DataInfo``); text models also offer ``tokenizer_for(cfg)``;
- ``forward(**inputs)`` takes the batch's input keys (``x`` or ``input_ids``/``attention_mask``)
  and returns logits;
- the output layer is the attribute ``classifier`` (compressors skip it by name by default).
"""
