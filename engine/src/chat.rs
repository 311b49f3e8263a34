//! Chat templates rendered from the template the model carries (minijinja).
