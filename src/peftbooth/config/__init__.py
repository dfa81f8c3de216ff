"""Configuration: the dataclasses of a training run and of every other command (one source for
flags, ``--config`` YAML, ``--print-config`` and the saved ``config.yaml``), their checks, the flags made from
them, and the DreamBooth example scripts' spellings."""
