"""How users reach fastreplay: the Python facade (api), the Typer CLI (cli), argument checks
shared by both (arguments) and the figures (plots)."""
