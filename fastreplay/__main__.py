"""`python -m fastreplay ...` (and `torchrun -m fastreplay ...`) run the CLI."""
from fastreplay.interface.cli import main

main()
