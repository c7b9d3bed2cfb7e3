"""Methods: one folder per paper, each a set of hooks on the shared tasks (lafs_jax/train).

A method supplies what is its own -- its views, its loss terms, its extra state, its config section and
validator, its export -- and gets the loop's resume, topology changes, crash safety, evaluators and
ahead-of-time compilation for free. Methods import models/, losses/, input/ and the floor, never train/
or eval/ (tests/test_layout.py checks it).
"""
