"""vlrlcd: RL capability distillation for small vision-language and text students."""

__version__ = "0.1.0"
