#!/usr/bin/env python3
"""Writes the tensor listing of a GGUF file as JSON, using the reference `gguf` package.

Usage: python3 list_gguf.py FILE.gguf > listing.json
The Rust test `gguf::tests::oracle_listing_matches_gguf_py` compares the reader against it.
Shapes are outermost-first (reversed ggml `ne`); offsets are absolute within the file.
"""
import json
import sys

import gguf

r = gguf.GGUFReader(sys.argv[1])
out = {
    "alignment": int(r.alignment),
    "data_offset": int(r.data_offset),
    "n_metadata": len([k for k in r.fields if not k.startswith("GGUF.")]),
    "tensors": [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(list(t.shape))],
            "offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
        }
        for t in r.tensors
    ],
}
json.dump(out, sys.stdout, indent=1)
print()
