"""Package layout only (metadata is in pyproject.toml): the top-level methods/ and tasks/ folders ship inside the
wheel as `dopsd_bench.methods` and `dopsd_bench.tasks_data`, for editable and non-editable installs alike.

pyproject.toml alone cannot combine package discovery with this mapping, hence this file. Nothing to run by hand:
`pip install -e .` or `pip install .`.
"""

from setuptools import find_namespace_packages, setup

CORE = find_namespace_packages(include=["dopsd_bench", "dopsd_bench.*"],
                               exclude=["*.__pycache__", "dopsd_bench.assets", "dopsd_bench.assets.*"])
setup(packages=CORE + ["dopsd_bench.methods", "dopsd_bench.tasks_data"],
      package_dir={"dopsd_bench.methods": "methods", "dopsd_bench.tasks_data": "tasks"})
