"""One `distill` run: its settings (`settings`), the driver (`driver`), the bookkeeping of a run
folder — run key, shards, resume, manifest (`bookkeeping`) —, torchrun coordination (`ranks`) and
the stage profile (`profile`)."""
