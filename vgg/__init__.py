"""The library beneath the stages: the paper's rules (`paper`), the nets (`models`), data
(`data`: folders, sharding, shards, augmentation, DALI loaders), training (`training`),
evaluation (`evaluation`), results (`results`: posteriors and metrics, the paper's tables,
claims, the report) and the artifacts the stages hand each other (`artifacts`).
It imports no stage."""
