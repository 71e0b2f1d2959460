"""Data: exams in, ArrayRecord datasets out, batches to the train step.

  synthetic/  the built-in phantom population and its generator (`whmae-generate`)
  ingest/     real exams: UK-Biobank-layout NIfTI and DICOM -> checked, canonical exams,
              manifest and QC (`whmae-prepare`, `whmae-qc`)
  dataset/    the on-disk format (ArrayRecord shards of self-describing exams), splits,
              verification (`whmae-dataset verify`) and the Grain input pipeline

Shared by them: `quantize` (float images -> uint8), `lookup` (label tables),
`worker_pool` (supervised worker processes for ingestion and the pipeline).
"""
