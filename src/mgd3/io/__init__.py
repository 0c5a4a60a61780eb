"""Files in and out: real data sets (`data`) and the distilled set on disk (`store`)."""
