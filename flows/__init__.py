"""Prefect orchestration of igpt: the flow `igpt` (flows/pipeline.py), its stage tasks (flows/stages.py),
retraining on new data (flows/retrain.py). Nothing here holds logic of its own; igpt_core does the work.

Plain functions for callers that are not Prefect-aware (the `igpt` command):
`flows.pipeline.run_pipeline(PipelineParams) -> PipelineSummary`, `flows.retrain.add_data(paths, to)`.
"""
