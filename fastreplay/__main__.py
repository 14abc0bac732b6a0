"""`python -m fastreplay ...` (and `torchrun -m fastreplay ...`) run the CLI."""
from .cli import main

main()
