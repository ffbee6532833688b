"""Data stages: demo data, readers, ingest (rows -> canonical records), input files, quality filters, similarity, dedup, chat-template formatting, split."""
