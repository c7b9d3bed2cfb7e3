"""Grain input: RecordIO / ArrayRecord / folder sources, subsets, transforms, pipelines, .bin pairs."""
