"""Running things: config, DeepSpeed training, evaluation, metrics and the command line."""
