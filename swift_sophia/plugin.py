"""The file to pass to ms-swift's `--external_plugins`: it registers the `sophia` model type and template.

Get its path with `sophia plugin-path` (or `python -m swift_sophia plugin-path`).
"""
import swift_sophia.ms_swift.register  # noqa: F401
