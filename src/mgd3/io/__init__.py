"""Files in and out: real data sets (`data`, the entry point, over `sources`, `arrays`, `folders` and
`imagenet_classes`), the distilled set on disk (`store` writes it, `set_reader` reads it back) and
labelled image grids (`grid`)."""
