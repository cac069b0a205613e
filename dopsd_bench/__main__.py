"""`python -m dopsd_bench ...` is the same as `dopsd-bench ...`."""

from dopsd_bench.cli import app

app(prog_name="dopsd-bench")
