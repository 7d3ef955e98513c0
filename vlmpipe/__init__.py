"""vlmpipe: a reproducible, DVC-orchestrated pipeline that trains and evaluates
two vision-language models (an image captioner and a visual QA model)."""

__version__ = "0.1.0"
