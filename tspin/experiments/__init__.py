"""The paper harness: the demo's task and runs, the study, its claims and statistics, and the job runner they use."""
