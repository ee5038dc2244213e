"""`python -m dbp` = the `dbp` command (works without the venv on PATH)."""
from dbp.cli import main

main()
