//! Reading and writing NumPy .npy files (the oracle's and --logits-out's format).
