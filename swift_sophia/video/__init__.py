"""Videos: where one comes from (`source`), how many and which frames are taken and how they are decoded
(`frames`), and its shots (`shots`: the detector, its frames, the boundaries, the cache, TransNetV2's isolation).
Imports nothing of ms-swift and nothing else of this package."""
