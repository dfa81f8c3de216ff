"""The adapters, split as PEFT's tuners are: the PEFT configs and target presets
(``peft_config``), attaching them to a model (``inject``), the factored LoHa/LoKr forward (``factored``), and
the identifier's trained input embedding (``token_embedding``)."""
