"""The built-in task specs (YAML). Installed as the data package `dopsd_bench.tasks_data`; see dopsd_bench/tasks.py."""
