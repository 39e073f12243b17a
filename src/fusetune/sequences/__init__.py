"""Sequences in a batch: per-document attention (varlen), the packing check (packed_sequences), and the
CUDA graphs of padding-free steps over bucketed shapes (buckets, graphs)."""
