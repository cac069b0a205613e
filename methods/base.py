"""`base`: the untuned model (the reference row of every table); nothing trains."""

from __future__ import annotations

from dopsd_bench.method import Method, MethodConfig
from dopsd_bench.registry import METHODS


@METHODS.register("base", description="the untuned model, sampled as is (reference row)")
class Base(Method):
    name = "base"
    description = "the untuned model, sampled as is (reference row)"
    Config = MethodConfig
    trains = False
    adapter = None
