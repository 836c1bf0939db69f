"""Sophia in ms-swift: the model type and template (`register`, `template`), the shot-caching dataset preprocessor,
request checks, the ms-swift half of sequence parallelism, and `patches/` (what changes in ms-swift's own
commands). `swift_sophia/plugin.py` (`sophia plugin-path`) loads it into a `swift` command."""
