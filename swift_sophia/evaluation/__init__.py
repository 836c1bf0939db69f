"""Evaluation of Sophia checkpoints with `swift eval` (EvalScope's native backend, `general_vmcq` sets).

    vmcq             writing a local video MCQ set in EvalScope's `general_vmcq` layout, one file per subset
    benchmarks/      converters from each benchmark's published files (Video-MME, MLVU, LongVideoBench,
                     EgoSchema, LVBench) to such a set, with the benchmark's own breakdown as subsets
    report           reading EvalScope's report of a run (score per subset)
    breakdown        accuracy by any field of the set's rows (overlapping categories too): `sophia eval-breakdown`
    swift_eval       running `swift eval` on a set as a subprocess (the environment passed on)
    niah, niah_set, prompt_length, heatmap   video needle in a haystack (`sophia niah`): the set, the prompt
                     tokens of each cell, the run, the heatmap

docs/evaluation.md gives the commands; what `swift eval` itself needs on video sets is patched by the
plugin (swift_sophia/ms_swift/patches/swift_eval.py).
"""
