"""Models from other libraries as fastreplay tasks; each integration is an optional extra and
imports its library only when used (huggingface: ``pip install 'fastreplay[hf]'``)."""
