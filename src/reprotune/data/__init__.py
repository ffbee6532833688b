"""Data stages: demo data, readers, ingest (rows -> canonical records), input files, quality filters, similarity, dedup, split, chat-template formatting."""

SPLITS = ("train", "val", "test")  # the split stage's parts, in order: a row is checked against earlier ones
