"""data_pipelines: query-performance pairs – harvest, import, validate (design.md §2)."""
