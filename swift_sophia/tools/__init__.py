"""The `sophia` commands' tools: checkpoints (tiny, random real shapes, conversion from InternVL), synthetic data,
shot precomputation and the pruning contact sheet."""
