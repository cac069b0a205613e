#!/usr/bin/env bash
# device run (not committed): one arm on a world without unsaid rotation and scale
export PYTHONPATH=$PWD
python3 -m pip install --no-deps --no-index -q .whl/*.whl > $OUT/pip.log 2>&1
timeout 190 python3 scripts/tune_base.py --arms 0:0.5 --unsaid angle=0,scale=0 --steps 1000 --out $OUT/a \
  --workers 15 > $OUT/tune.log 2>&1
echo "tune rc $? at $SECONDS s"; tail -4 $OUT/tune.log
