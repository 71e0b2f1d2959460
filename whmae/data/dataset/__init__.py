"""The dataset format and how it is read: exam records (`records`), shards and
dataset_info (`shards`), splits (`splits`), `whmae-dataset verify` (`verify`) and the
Grain input pipeline (`pipeline`)."""
