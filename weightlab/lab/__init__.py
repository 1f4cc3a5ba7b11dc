"""weightlab.lab: the demo and the research harnesses built on the pillars (never imported by them).

``demo`` is ``weightlab demo`` (train two MNIST-1D MLPs, then one section per pillar from
``demo_<pillar>``); ``merge_science`` is the MNIST-1D input-transform merging benchmark behind
``scripts/merge_science.py`` and docs/merging.md.
"""
