"""Prefect orchestration of igpt: the flow `igpt` (flows/pipeline.py), its parameters and summary
(flows/params.py), its stage tasks (flows/stages.py), how one runs and is reused (flows/runner.py), their
typed references (flows/refs.py), the
shared register -> probe -> samples -> finetune end (flows/finish.py), the finetune stage and the
classifier's registration (flows/classifier.py), retraining on new data (flows/retrain.py), the
content-addressed workspace that caches stages (flows/workspace.py). Nothing here holds logic of its own;
igpt_core does the work.

Plain functions for callers that are not Prefect-aware (the `igpt` command):
`flows.pipeline.run_pipeline(PipelineParams) -> PipelineSummary`, `flows.retrain.add_data(paths, to)`.
"""
