"""The model: configuration, modeling (transformers' layout), and what the forward pass uses (frame pruning, the
extended sequence, attention routing, chunking, the prefill cache, the lean prefill, frame budgets, Liger, the
torch half of sequence parallelism). Imports nothing of ms-swift; of this repository only `sophia_kernels`."""
