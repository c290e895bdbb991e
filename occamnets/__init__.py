"""occamnets: OccamNets (ECCV 2022) on top of occam_kernels.

Data flows one way: `cli` (the `occamnets` command, imported by nothing) and `demo` call
`train` and `evaluate`; those build on `config` (RunConfig and the presets), `models` (OccamNet,
which owns early exit, and the ResNet baseline; typed outputs), `losses` (OccamLoss) and
`data` (Biased MNIST); `viz` draws what `evaluate` gathers. Models call the public ops of
occam_kernels, never its kernels.
"""
