"""The file to pass to ms-swift's `--external_plugins`: it registers the `sophia` model type and template
(`swift_sophia.ms_swift.register`) and applies Sophia's changes to ms-swift's commands
(`swift_sophia.ms_swift.patches`).

Get its path with `sophia plugin-path` (or `python -m swift_sophia plugin-path`).
"""
from swift_sophia.ms_swift import patches, register  # noqa: F401  (register: the model type, the template)

patches.apply()
