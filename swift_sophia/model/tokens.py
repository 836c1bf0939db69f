"""Sophia's special tokens (no ms-swift import, so the model and the tiny builder work without it)."""
VIDEO_START, VIDEO_CONTEXT, VIDEO_END = "<vid>", "<VIDEO_CONTEXT>", "</vid>"
IMAGE_START, IMAGE_CONTEXT, IMAGE_END = "<img>", "<IMG_CONTEXT>", "</img>"
SPECIAL_TOKENS = [VIDEO_START, VIDEO_CONTEXT, VIDEO_END, IMAGE_START, IMAGE_CONTEXT, IMAGE_END]
