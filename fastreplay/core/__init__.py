"""The algorithm: a recipe made concrete (recipe), the flat model (models), the SGD step and its
adjoint (optim, kernels), training with checkpoints (train, multitrain), the reverse pass
(replay), measurements (measure) and the unrolled-autograd oracle (reference). It knows nothing
of command lines or run directories; the store is handed to it."""
