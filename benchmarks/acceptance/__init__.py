"""The stages of ``benchmarks/gpu_acceptance.py`` (the driver: command line, one process per
stage, report). Each stage module has one ``stage_<name>(stage, device, profile)`` entry point.

=============  ==============================================================================
``common.py``  sizes (``Profile``: GPU, smoke, small), tolerances, the per-stage recorder
               (``Stage``: PASS/FAIL lines, ``stages/<name>.json`` after every check), helpers
``loss.py``    the loss op vs a float64 reference, the fused op vs the unfused path
``speed.py``   ``bench_loss.py`` / ``bench_fused.py`` rows and the README's targets
``models.py``  random HF Qwen3 / GLM-4-0414 -> converter -> Megatron: logits vs transformers
``train.py``   ``python -m eaft_megatron.train`` under torchrun on prepared data
=============  ==============================================================================
"""
